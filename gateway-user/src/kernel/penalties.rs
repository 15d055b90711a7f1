//! Penalising clients that flood: keep sending at flood rates after being
//! told 429 with a `Retry-After`.
//!
//! The rule: a client address that is refused with a gateway-made 429 more
//! than `threshold` times within one window (default 300 in 1 s) is flooding.
//! Well-behaved clients never get there: a client that keeps sending into a
//! capped model at 100 requests/s collects at most 100 429s a second, and SDK
//! retries that honour `Retry-After` far fewer; a flood of 1,000/s crosses
//! the line within a third of a second.
//!
//! - [`PenaltyPolicy`]: counts 429s per client address in fixed windows and
//!   decides, with a reason: `flood` (refused from now on, in the kernel when
//!   it is loaded), `flood_behind_proxy` (a client a trusted proxy forwards
//!   for: answered 429 by the proxy, never refused by closing the proxy's
//!   shared connection) or `exempt` (in `--penalty-exempt-cidrs`: never
//!   penalised). A penalty lasts until the end of the current rate-limit
//!   (RPS) window plus the penalty duration, in Redis server time, so every
//!   replica's view of "the current window" agrees with the limiter.
//! - [`PenaltyTable`]: penalised addresses and their expiry, in userspace. The
//!   direct table mirrors the kernel map and is the enforcement itself when
//!   kernel assist is not active (the listener closes such connections right
//!   after accept); the behind-proxy table is only ever read per request.
//! - [`Enforcer`]: applies a penalty to its table and, for direct clients when
//!   loaded, the kernel map.
//! - [`spawn_redis_sync`]: publishes local penalties to Redis (a sorted set for
//!   late joiners plus a pub/sub message) and applies every replica's.

use std::collections::HashMap;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
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
    /// 429s within one window that mark a client as flooding; 0 disables penalties.
    pub threshold: u32,
    /// Length of the windows 429s are counted in.
    pub window: Duration,
    /// How long a penalty lasts past the end of the current RPS window.
    pub duration: Duration,
}

impl Default for PenaltySettings {
    /// The defaults of the `--penalty-*` flags.
    fn default() -> Self {
        Self { threshold: 300, window: Duration::from_secs(1), duration: Duration::from_secs(10) }
    }
}

/// A network given as `10.0.0.0/8`, `fd00::/8`, or a single address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr(pub IpNet);

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        match (text.parse::<IpNet>(), text.parse::<IpAddr>()) {
            (Ok(net), _) => Ok(Self(net.trunc())),
            (_, Ok(ip)) => Ok(Self(IpNet::from(normalize(ip)))),
            _ => Err(format!("`{text}` is neither a CIDR (10.0.0.0/8) nor an IP address")),
        }
    }
}

/// Whether `ip` (IPv4-mapped IPv6 seen as IPv4) falls in one of `networks`.
pub fn in_any(networks: &[Cidr], ip: IpAddr) -> bool {
    let ip = normalize(ip);
    networks.iter().any(|Cidr(net)| net.contains(&ip))
}

/// The client a request is accounted to: the connection's peer, or the
/// client a trusted proxy forwards for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr {
    pub ip: IpAddr,
    /// Reached through a trusted proxy: it shares the proxy's connections, so
    /// it is refused with 429s and never by closing or refusing connections.
    pub behind_proxy: bool,
}

impl ClientAddr {
    /// A client connected directly.
    pub fn direct(ip: IpAddr) -> Self {
        Self { ip: normalize(ip), behind_proxy: false }
    }

    fn scope(self) -> Scope {
        if self.behind_proxy { Scope::BehindProxy } else { Scope::Direct }
    }
}

/// Which table a penalty lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The client's own connections are refused (kernel or accept).
    Direct,
    /// A client behind a trusted proxy: its requests are answered 429.
    BehindProxy,
}

/// Why the policy decided about a client (log field and metric label `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PenaltyReason {
    /// A direct client flooded: refused from now on.
    Flood,
    /// A client behind a trusted proxy flooded: answered 429 from now on.
    FloodBehindProxy,
    /// An address in `--penalty-exempt-cidrs` flooded: not penalised.
    Exempt,
}

impl PenaltyReason {
    pub const ALL: [Self; 3] = [Self::Flood, Self::FloodBehindProxy, Self::Exempt];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Flood => "flood",
            Self::FloodBehindProxy => "flood_behind_proxy",
            Self::Exempt => "exempt",
        }
    }
}

/// What the policy decided when a client crossed the threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PenaltyDecision {
    pub reason: PenaltyReason,
    /// End of the penalty (Redis time, ms); nothing is enforced for `Exempt`.
    pub until_ms: u64,
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
    exempt: Vec<Cidr>,
    strikes: Mutex<HashMap<IpAddr, Strikes>>,
}

impl PenaltyPolicy {
    pub fn new(settings: PenaltySettings, exempt: Vec<Cidr>) -> Self {
        Self { settings, exempt, strikes: Mutex::new(HashMap::new()) }
    }

    pub fn settings(&self) -> PenaltySettings {
        self.settings
    }

    /// Counts a 429 sent to `client` at `now_ms` (Redis time); decides when
    /// this one crosses the threshold. Counting then starts over, so a client
    /// still flooding is decided about once per window it floods in.
    pub fn record_429(&self, client: ClientAddr, now_ms: u64) -> Option<PenaltyDecision> {
        let until_ms = self.crossed(client.ip, now_ms)?;
        let reason = if in_any(&self.exempt, client.ip) {
            PenaltyReason::Exempt
        } else if client.behind_proxy {
            PenaltyReason::FloodBehindProxy
        } else {
            PenaltyReason::Flood
        };
        Some(PenaltyDecision { reason, until_ms })
    }

    /// Counts a 429 for `ip`; the penalty's end when this one crosses the threshold.
    fn crossed(&self, ip: IpAddr, now_ms: u64) -> Option<u64> {
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

/// Applies penalties to the userspace tables and, for direct clients when
/// loaded, the kernel map.
#[derive(Debug)]
pub struct Enforcer {
    /// Direct clients: their connections are refused.
    pub table: Arc<PenaltyTable>,
    /// Clients behind trusted proxies: their requests are answered 429.
    pub behind_proxy: PenaltyTable,
    pub clock: Arc<PenaltyClock>,
    pub kernel: Option<Arc<dyn KernelPenalties>>,
    pub tallies: Arc<AssistTallies>,
}

impl Enforcer {
    /// An enforcer with empty tables.
    pub fn new(clock: PenaltyClock, kernel: Option<Arc<dyn KernelPenalties>>, tallies: Arc<AssistTallies>) -> Self {
        Self {
            table: Arc::new(PenaltyTable::default()),
            behind_proxy: PenaltyTable::default(),
            clock: Arc::new(clock),
            kernel,
            tallies,
        }
    }

    fn table(&self, scope: Scope) -> &PenaltyTable {
        match scope {
            Scope::Direct => &self.table,
            Scope::BehindProxy => &self.behind_proxy,
        }
    }

    /// Penalises `ip` in `scope` until `until_redis_ms` (Redis time). Returns
    /// whether it changed anything (a penalty already known is not applied
    /// twice); a new penalty is logged, an extension is not.
    pub fn apply(&self, ip: IpAddr, until_redis_ms: u64, scope: Scope, origin: Origin) -> bool {
        let ip = normalize(ip);
        let until = self.clock.to_local(until_redis_ms);
        let now = self.clock.local_now_ms();
        let table = self.table(scope);
        let was_penalised = table.is_penalised(ip, now);
        if until <= now || !table.insert(ip, until) {
            return false;
        }
        if scope == Scope::Direct
            && let Some(kernel) = &self.kernel
        {
            kernel.insert(ip, Duration::from_millis(until - now), until);
        }
        let tally = match origin {
            Origin::Local => &self.tallies.penalties_local,
            Origin::Redis => &self.tallies.penalties_redis,
        };
        tally.fetch_add(1, Ordering::Relaxed);
        if !was_penalised && origin == Origin::Redis {
            tracing::info!(client = %ip, scope = ?scope, until_unix_ms = until, in_ms = until - now, "client penalised by another replica");
        }
        true
    }

    /// How long `client` stays penalised, if it is.
    pub fn remaining(&self, client: ClientAddr) -> Option<Duration> {
        let table = self.table(client.scope());
        if table.is_empty() {
            return None;
        }
        let now = self.clock.local_now_ms();
        table.until(client.ip).filter(|until| *until > now).map(|until| Duration::from_millis(until - now))
    }

    /// Drops expired penalties from the tables and the kernel map.
    pub fn sweep(&self) {
        let now = self.clock.local_now_ms();
        for ip in self.table.sweep(now) {
            if let Some(kernel) = &self.kernel {
                kernel.remove(ip);
            }
        }
        self.behind_proxy.sweep(now);
    }
}

/// A penalty on its way to or from Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shared {
    pub ip: IpAddr,
    /// Expiry, Redis time (ms).
    pub until_ms: u64,
    pub scope: Scope,
}

/// Marks penalties of clients behind trusted proxies in Redis (message suffix
/// and sorted-set member prefix), so no replica refuses their connections.
const BEHIND_PROXY: &str = "behind-proxy";

impl Shared {
    /// The sorted-set member: the address, prefixed for behind-proxy clients.
    fn member(&self) -> String {
        match self.scope {
            Scope::Direct => self.ip.to_string(),
            Scope::BehindProxy => format!("{BEHIND_PROXY}/{}", self.ip),
        }
    }

    fn from_member(member: &str, until_ms: u64) -> Option<Self> {
        let (scope, ip) = match member.split_once('/') {
            Some((BEHIND_PROXY, ip)) => (Scope::BehindProxy, ip),
            Some(_) => return None,
            None => (Scope::Direct, member),
        };
        Some(Self { ip: ip.parse().ok()?, until_ms, scope })
    }

    /// The pub/sub message: `"<ip> <expiry ms>"`, plus ` behind-proxy` for such clients.
    fn message(&self) -> String {
        match self.scope {
            Scope::Direct => format!("{} {}", self.ip, self.until_ms),
            Scope::BehindProxy => format!("{} {} {BEHIND_PROXY}", self.ip, self.until_ms),
        }
    }
}

/// Publishes local penalties to Redis and applies every replica's to
/// `enforcer`. Returns the sender the façade queues local penalties on.
pub fn spawn_redis_sync(
    url: &str,
    enforcer: Arc<Enforcer>,
    shutdown: CancellationToken,
) -> anyhow::Result<mpsc::Sender<Shared>> {
    let client = crate::redis_link::open(url).map_err(anyhow::Error::msg)?;
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
    mut rx: mpsc::Receiver<Shared>,
    shutdown: CancellationToken,
) {
    let mut con: Option<redis::aio::MultiplexedConnection> = None;
    loop {
        let penalty = tokio::select! {
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
                    tracing::warn!(error = %err, client = %penalty.ip, "penalty not published: Redis unreachable");
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
            .arg(penalty.until_ms)
            .arg(penalty.member())
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(REDIS_KEY)
            .arg("-inf")
            .arg(now)
            .ignore()
            .cmd("PUBLISH")
            .arg(REDIS_CHANNEL)
            .arg(penalty.message())
            .ignore();
        if let Err(err) = with_timeout(pipe.query_async::<()>(c)).await {
            tracing::warn!(error = %err, client = %penalty.ip, "penalty not published to Redis");
            con = None;
        }
    }
}

/// Parses a `"<ip> <expiry ms>[ behind-proxy]"` message.
pub fn parse_message(text: &str) -> Option<Shared> {
    let mut fields = text.split_whitespace();
    let (ip, until_ms) = (fields.next()?.parse().ok()?, fields.next()?.parse().ok()?);
    let scope = match fields.next() {
        None => Scope::Direct,
        Some(BEHIND_PROXY) => Scope::BehindProxy,
        Some(_) => return None,
    };
    fields.next().is_none().then_some(Shared { ip, until_ms, scope })
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
        if let Some(penalty) = Shared::from_member(&member, score as u64) {
            enforcer.apply(penalty.ip, penalty.until_ms, penalty.scope, Origin::Redis);
        }
    }
    tracing::info!("penalty sync with Redis established");
    let mut messages = pubsub.on_message();
    while let Some(message) = messages.next().await {
        let payload: String = message.get_payload().unwrap_or_default();
        match parse_message(&payload) {
            Some(penalty) => {
                enforcer.apply(penalty.ip, penalty.until_ms, penalty.scope, Origin::Redis);
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

    fn policy(threshold: u32) -> PenaltyPolicy {
        PenaltyPolicy::new(settings(threshold), Vec::new())
    }

    fn direct() -> ClientAddr {
        ClientAddr::direct(CLIENT)
    }

    fn until(decision: Option<PenaltyDecision>) -> Option<u64> {
        decision.map(|d| d.until_ms)
    }

    #[test]
    fn expiry_is_the_end_of_the_current_rps_window_plus_duration() {
        assert_eq!(penalty_until(1_000_000_000, Duration::from_secs(5)), 1_000_006_000);
        assert_eq!(penalty_until(1_000_000_999, Duration::from_secs(5)), 1_000_006_000);
        assert_eq!(penalty_until(1_000_001_000, Duration::from_secs(5)), 1_000_007_000);
    }

    #[test]
    fn threshold_counts_429s_within_one_window() {
        let policy = policy(3);
        let t = 1_000_000_250;
        assert_eq!(policy.record_429(direct(), t), None);
        assert_eq!(policy.record_429(direct(), t + 10), None);
        let decided = policy.record_429(direct(), t + 20);
        assert_eq!(decided, Some(PenaltyDecision { reason: PenaltyReason::Flood, until_ms: 1_000_006_000 }));
        // Counting starts over after a penalty.
        assert_eq!(policy.record_429(direct(), t + 30), None);
    }

    /// The default rule against the clients it must never punish and the
    /// floods it must stop, second by second in one window each.
    #[test]
    fn default_rule_spares_steady_clients_and_catches_floods() {
        let policy = PenaltyPolicy::new(PenaltySettings::default(), Vec::new());
        let start = 1_000_000_000;
        // 100 refused requests a second for a minute: never a decision.
        for i in 0..6_000u64 {
            assert_eq!(policy.record_429(direct(), start + i * 10), None, "request {i}");
        }
        // 1,000 a second: decided within the first third of a second.
        let flood = ClientAddr::direct("10.0.0.9".parse().unwrap());
        let decided_at = (0..1_000u64).find(|i| policy.record_429(flood, start + 60_000 + i).is_some());
        assert_eq!(decided_at, Some(299), "the 300th 429 of the second decides");
    }

    #[test]
    fn strikes_of_an_older_window_do_not_count() {
        let policy = policy(2);
        assert_eq!(policy.record_429(direct(), 1_000_009_999), None);
        assert_eq!(policy.record_429(direct(), 1_000_010_000), None, "a new 10 s window starts");
        assert!(policy.record_429(direct(), 1_000_010_001).is_some());
    }

    #[test]
    fn zero_threshold_disables_penalties() {
        let policy = policy(0);
        for i in 0..100 {
            assert_eq!(policy.record_429(direct(), 1_000_000_000 + i), None);
        }
    }

    #[test]
    fn clients_are_counted_separately_and_mapped_addresses_are_ipv4() {
        let policy = policy(2);
        let other = ClientAddr::direct("10.0.0.8".parse().unwrap());
        assert_eq!(policy.record_429(direct(), 1_000_000_000), None);
        assert_eq!(policy.record_429(other, 1_000_000_000), None);
        assert!(policy.record_429(direct(), 1_000_000_001).is_some());
        assert_eq!(normalize("::ffff:10.0.0.7".parse().unwrap()), CLIENT);
        assert_eq!(ClientAddr::direct("::ffff:10.0.0.7".parse().unwrap()), direct());
    }

    #[test]
    fn exempt_networks_and_proxied_clients_get_their_own_reasons() {
        let exempt = vec!["10.0.0.0/24".parse().unwrap(), "fd00::1".parse().unwrap()];
        let policy = PenaltyPolicy::new(settings(1), exempt);
        let reason = |client| policy.record_429(client, 1_000_000_000).map(|d| d.reason);
        assert_eq!(reason(direct()), Some(PenaltyReason::Exempt));
        assert_eq!(reason(ClientAddr::direct("::ffff:10.0.0.200".parse().unwrap())), Some(PenaltyReason::Exempt));
        assert_eq!(reason(ClientAddr::direct("fd00::1".parse().unwrap())), Some(PenaltyReason::Exempt));
        assert_eq!(reason(ClientAddr::direct("10.0.1.7".parse().unwrap())), Some(PenaltyReason::Flood));
        let behind = ClientAddr { ip: "192.0.2.1".parse().unwrap(), behind_proxy: true };
        assert_eq!(reason(behind), Some(PenaltyReason::FloodBehindProxy));
    }

    #[test]
    fn cidrs_parse_networks_and_single_addresses() {
        assert!(in_any(&["10.1.2.3".parse().unwrap()], "10.1.2.3".parse().unwrap()));
        assert!(!in_any(&["10.1.2.3".parse().unwrap()], "10.1.2.4".parse().unwrap()));
        assert!(in_any(&["10.1.2.3/16".parse().unwrap()], "10.1.200.1".parse().unwrap()), "host bits ignored");
        assert!(in_any(&["::/0".parse().unwrap()], "2001:db8::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("ingress".parse::<Cidr>().is_err());
    }

    #[test]
    fn messages_and_members_round_trip_with_their_scope() {
        let direct = Shared { ip: CLIENT, until_ms: 1_700_000_000_123, scope: Scope::Direct };
        assert_eq!(direct.message(), "10.0.0.7 1700000000123");
        assert_eq!(parse_message(&direct.message()), Some(direct));
        let behind = Shared { ip: "::1".parse().unwrap(), until_ms: 5, scope: Scope::BehindProxy };
        assert_eq!(behind.message(), "::1 5 behind-proxy");
        assert_eq!(parse_message(&behind.message()), Some(behind));
        assert_eq!(Shared::from_member(&behind.member(), 5), Some(behind));
        assert_eq!(Shared::from_member(&direct.member(), 1_700_000_000_123), Some(direct));
        assert_eq!(parse_message("garbage"), None);
        assert_eq!(parse_message("10.0.0.7 5 sideways"), None);
        assert_eq!(Shared::from_member("elsewhere/10.0.0.7", 5), None);
    }

    fn enforcer(clock: PenaltyClock) -> Enforcer {
        Enforcer::new(clock, None, Arc::new(AssistTallies::default()))
    }

    #[tokio::test(start_paused = true)]
    async fn penalty_expires_at_the_aligned_time() {
        let enforcer = enforcer(PenaltyClock::starting_at(1_000_000_400));
        let policy = policy(2);
        let now = enforcer.clock.redis_now_ms();
        assert_eq!(policy.record_429(direct(), now), None);
        let until = until(policy.record_429(direct(), now)).unwrap();
        assert!(enforcer.apply(CLIENT, until, Scope::Direct, Origin::Local));
        assert!(
            !enforcer.apply(CLIENT, until, Scope::Direct, Origin::Redis),
            "the same penalty from Redis changes nothing"
        );
        assert_eq!(enforcer.tallies.penalties_local.load(Ordering::Relaxed), 1);
        assert_eq!(enforcer.tallies.penalties_redis.load(Ordering::Relaxed), 0);

        // 0.6 s to the end of the RPS window, then 5 s.
        tokio::time::advance(Duration::from_millis(5_599)).await;
        assert!(enforcer.table.is_penalised(CLIENT, enforcer.clock.local_now_ms()));
        assert_eq!(enforcer.remaining(direct()), Some(Duration::from_millis(1)));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!enforcer.table.is_penalised(CLIENT, enforcer.clock.local_now_ms()));
        assert_eq!(enforcer.remaining(direct()), None);
        enforcer.sweep();
        assert!(enforcer.table.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn behind_proxy_penalties_never_touch_the_connection_table() {
        let enforcer = enforcer(PenaltyClock::starting_at(1_000_000_000));
        let behind = ClientAddr { ip: CLIENT, behind_proxy: true };
        assert!(enforcer.apply(CLIENT, 1_000_003_000, Scope::BehindProxy, Origin::Local));
        assert!(enforcer.table.is_empty(), "connections from that address are still accepted");
        assert_eq!(enforcer.remaining(behind), Some(Duration::from_secs(3)));
        assert_eq!(enforcer.remaining(direct()), None);
        tokio::time::advance(Duration::from_secs(3)).await;
        enforcer.sweep();
        assert!(enforcer.behind_proxy.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn redis_time_converts_to_local_time() {
        let enforcer = enforcer(PenaltyClock::starting_at(1_000_000_000));
        // Redis runs 2 s ahead of this host.
        enforcer.clock.set_redis_offset(2_000);
        assert_eq!(enforcer.clock.redis_now_ms(), 1_000_002_000);
        assert!(enforcer.apply(CLIENT, 1_000_003_000, Scope::Direct, Origin::Redis));
        assert_eq!(enforcer.table.until(CLIENT), Some(1_000_001_000));
        assert_eq!(enforcer.tallies.penalties_redis.load(Ordering::Relaxed), 1);
        // Already expired in Redis time: ignored.
        assert!(!enforcer.apply("10.0.0.9".parse().unwrap(), 1_000_001_500, Scope::Direct, Origin::Redis));
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_penalty_extends_an_earlier_one() {
        let enforcer = enforcer(PenaltyClock::starting_at(1_000_000_000));
        assert!(enforcer.apply(CLIENT, 1_000_005_000, Scope::Direct, Origin::Local));
        assert!(!enforcer.apply(CLIENT, 1_000_004_000, Scope::Direct, Origin::Redis));
        assert!(enforcer.apply(CLIENT, 1_000_009_000, Scope::Direct, Origin::Redis));
        assert_eq!(enforcer.table.until(CLIENT), Some(1_000_009_000));
    }
}
