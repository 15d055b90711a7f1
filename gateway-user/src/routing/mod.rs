//! Routing: choosing one ready pod for a request.
//!
//! Every strategy is one file implementing [`Strategy`] and one line in the
//! registry below, the only list of strategy names. Strategies choose from
//! state (the gateway's in-flight counts, the engine metrics snapshot, their
//! own indexes); they never do IO and never forward.
//!
//! A strategy scores the candidates, lower is better, and the default pick is
//! the lowest score, ties going to the pod with fewer requests in flight,
//! then to chance. Scores are what the weighted mix `name:weight,...`
//! combines. A strategy whose inputs are missing (no fresh engine metrics,
//! no `user` header...) says why; the [`Router`] then routes by least-request,
//! counts the fallback and logs it (rate-limited).

mod config;
mod filter;
pub mod fleet;
pub mod gpu_profile;
mod mix;
pub mod prefix_index;
mod ties;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

pub use config::{PrefixTokenizer, RoutingConfig, VtcTimeUnit};
pub use filter::LabelSelector;

use crate::discovery::{LoadClock, PodInfo};
use crate::engine_metrics::{Gauges, MetricsView, PodMetrics, Reading, Unfresh};
use crate::metrics::RoutingMetrics;
use ties::Lowest;

/// What a strategy is built from: one registry line turns it into the strategy.
struct Build<'a> {
    config: &'a RoutingConfig,
    hasher: &'a Arc<prefix_index::PrefixHasher>,
    metrics: &'a RoutingMetrics,
    fleet: &'a fleet::FleetState,
    slo: &'a Arc<slo::SloState>,
}

/// Declares each strategy's module and how it is built; [`registered`] lists
/// them in this order.
macro_rules! registry {
    ($($vis:vis $module:ident => $build:expr,)+) => {
        $($vis mod $module;)+

        /// Every strategy, in registration order.
        fn registered(build: &Build<'_>) -> Vec<Arc<dyn Strategy>> {
            let builders: &[fn(&Build<'_>) -> Vec<Arc<dyn Strategy>>] = &[$(|b| built(b, $build)),+];
            builders.iter().flat_map(|new| new(build)).collect()
        }
    };
}

/// Runs one registry line.
fn built<R: Built>(build: &Build<'_>, new: impl FnOnce(&Build<'_>) -> R) -> Vec<Arc<dyn Strategy>> {
    new(build).list()
}

/// What a registry line builds: one strategy, or a family sharing one file
/// (the four `slo*`).
trait Built {
    fn list(self) -> Vec<Arc<dyn Strategy>>;
}

impl<T: Strategy + 'static> Built for Arc<T> {
    fn list(self) -> Vec<Arc<dyn Strategy>> {
        vec![self]
    }
}

impl Built for Vec<Arc<dyn Strategy>> {
    fn list(self) -> Vec<Arc<dyn Strategy>> {
        self
    }
}

// The registry: the only list of strategies. A strategy is one file and one
// line here; its name is what its `Strategy::name` says.
registry! {
    random => |_| Arc::new(random::Random),
    least_request => |_| Arc::new(least_request::LeastRequest),
    least_busy_time => |_| Arc::new(least_busy_time::LeastBusyTime),
    least_latency => |_| Arc::new(least_latency::LeastLatency),
    least_kv_cache => |_| Arc::new(least_kv_cache::LeastKvCache),
    least_gpu_cache => |_| Arc::new(least_gpu_cache::LeastGpuCache),
    least_utilization => |_| Arc::new(least_utilization::LeastUtilization),
    throughput => |_| Arc::new(throughput::Throughput),
    power_of_two => |_| Arc::new(power_of_two::PowerOfTwo),
    prefix_cache => |b| Arc::new(prefix_cache::PrefixCache::new(
        b.config,
        Arc::clone(b.hasher),
        Arc::clone(&b.fleet.prefix),
        Arc::clone(&b.fleet.link),
        b.metrics.clone(),
    )),
    prefix_cache_preble => |b| {
        Arc::new(prefix_cache_preble::PrefixCachePreble::new(b.config, Arc::clone(b.hasher), b.metrics.clone()))
    },
    vtc_basic => |b| Arc::new(vtc_basic::VtcBasic::new(b.config, Arc::clone(&b.fleet.tokens), Arc::clone(&b.fleet.link))),
    session_affinity => |_| Arc::new(session_affinity::SessionAffinity),
    pub pd => |b| Arc::new(pd::PdRouter::new(b.config, Arc::clone(b.hasher))),
    pub slo => |b| slo::family(b.slo),
}

/// Request headers strategies read.
pub mod headers {
    use http::header::HeaderName;
    /// The user, for `vtc-basic` (and limits).
    pub const USER: HeaderName = HeaderName::from_static("user");
    /// `session-affinity`: base64 of the `IP:port` of the pod to stay on.
    pub const SESSION_ID: HeaderName = HeaderName::from_static("x-session-id");
    /// `session-affinity`: any key, mapped to a pod by rendezvous hashing.
    pub const SESSION_KEY: HeaderName = HeaderName::from_static("x-aibrix-session-key");
    /// A label selector restricting the candidate pods.
    pub const EXTERNAL_FILTER: HeaderName = HeaderName::from_static("external-filter");
}

/// Why a strategy could not score a request. The label of
/// `aibrix_gateway_routing_fallbacks_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unscored {
    /// A candidate has no engine metrics (never scraped, or the series its
    /// score needs is not exported).
    MetricsMissing,
    /// A candidate's engine metrics are older than the staleness cut-off.
    MetricsStale,
    /// `vtc-basic` without a `user` header.
    NoUser,
    /// `session-affinity` without a usable `x-session-id` or `x-aibrix-session-key`.
    NoSession,
    /// The strategy has no scores (random, power-of-two).
    NotScorable,
    /// `slo*`: no candidate's deployment has a GPU profile that ranks the request.
    NoSloProfile,
}

impl Unscored {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MetricsMissing => "metrics_missing",
            Self::MetricsStale => "metrics_stale",
            Self::NoUser => "no_user",
            Self::NoSession => "no_session",
            Self::NotScorable => "not_scorable",
            Self::NoSloProfile => "no_slo_profile",
        }
    }
}

/// Gives a request's prompt text (the proxy's parsed request assembles it
/// once, on first use).
pub type PromptSource<'a> = dyn Fn() -> &'a str + Sync + 'a;

/// What a strategy may look at besides the pods.
pub struct RouteRequest<'a> {
    /// The model, as discovered (a bounded metric label).
    pub model: &'a Arc<str>,
    /// The request body.
    pub body: &'a [u8],
    /// Header `user`.
    pub user: Option<&'a str>,
    /// Header `x-session-id`.
    pub session_id: Option<&'a str>,
    /// Header `x-aibrix-session-key`.
    pub session_key: Option<&'a str>,
    /// Every pod's engine metrics as of this request.
    pub metrics: MetricsView,
    /// Where the prompt text comes from, when not from the whole body.
    prompt_source: Option<&'a PromptSource<'a>>,
    prompt: OnceLock<String>,
    prefix_hashes: OnceLock<Vec<u64>>,
    /// The prompt's cl100k token count.
    prompt_tokens: OnceLock<i64>,
    /// The config profile the request runs under.
    profile_name: &'a str,
    /// That profile, when the model's config defines it.
    profile: Option<&'a crate::profiles::Profile>,
    /// `slo*`: the request's features, kept from its first try to its retries.
    slo_features: OnceLock<Arc<slo::Features>>,
}

impl<'a> RouteRequest<'a> {
    /// A request for `model` with `body`; headers and metrics are added with
    /// the `with_*` methods. The prompt is the body itself until
    /// [`Self::with_prompt_source`] says where to find it.
    pub fn new(model: &'a Arc<str>, body: &'a [u8]) -> Self {
        Self {
            model,
            body,
            user: None,
            session_id: None,
            session_key: None,
            metrics: MetricsView::empty(),
            prompt_source: None,
            prompt: OnceLock::new(),
            prefix_hashes: OnceLock::new(),
            prompt_tokens: OnceLock::new(),
            profile_name: crate::profiles::DEFAULT_PROFILE,
            profile: None,
            slo_features: OnceLock::new(),
        }
    }

    /// Reads the headers strategies use.
    pub fn with_headers(mut self, map: &'a HeaderMap) -> Self {
        let text = |name: &HeaderName| map.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        self.user = text(&headers::USER).filter(|u| !u.is_empty());
        self.session_id = text(&headers::SESSION_ID).filter(|s| !s.is_empty());
        self.session_key = text(&headers::SESSION_KEY).filter(|s| !s.is_empty());
        self
    }

    /// The engine metrics strategies read.
    pub fn with_metrics(mut self, metrics: MetricsView) -> Self {
        self.metrics = metrics;
        self
    }

    /// Where the prompt text is found (asked only when a strategy needs the
    /// prompt).
    pub fn with_prompt_source(mut self, source: &'a PromptSource<'a>) -> Self {
        self.prompt_source = Some(source);
        self
    }

    /// The prompt's prefix hashes, worked out before routing (off the async
    /// workers, for large bodies), so strategies do not redo them.
    pub fn with_prefix_hashes(self, prefix_hashes: Vec<u64>) -> Self {
        let _ = self.prefix_hashes.set(prefix_hashes);
        self
    }

    /// The prompt's token count, counted before routing (off the async
    /// workers, for large bodies).
    pub fn with_prompt_tokens(self, tokens: Option<i64>) -> Self {
        if let Some(tokens) = tokens {
            let _ = self.prompt_tokens.set(tokens);
        }
        self
    }

    /// The config profile the request runs under (`pd` reads each pod's
    /// own settings for it, and the profile's score policies).
    pub fn with_profile(mut self, name: &'a str, profile: Option<&'a crate::profiles::Profile>) -> Self {
        self.profile_name = name;
        self.profile = profile;
        self
    }

    /// The name of the request's config profile.
    pub fn profile_name(&self) -> &str {
        self.profile_name
    }

    /// The `routingConfig` of the request's profile.
    pub fn profile_routing(&self) -> Option<&crate::profiles::ProfileRouting> {
        self.profile?.routing_config.as_ref()
    }

    /// The prompt's cl100k token count (as AIBrix counts prompt length).
    pub fn prompt_tokens(&self) -> i64 {
        *self.prompt_tokens.get_or_init(|| crate::tokens::count_tokens(self.prompt()))
    }

    /// The prompt text.
    pub fn prompt(&self) -> &str {
        match self.prompt_source {
            Some(source) => source(),
            None => self.prompt.get_or_init(|| String::from_utf8_lossy(self.body).into_owned()),
        }
    }

    /// The prompt's chained block hashes, computed once per request by
    /// whichever prefix-aware strategy asks first (they share one hasher).
    fn prefix_hashes(&self, hasher: &prefix_index::PrefixHasher) -> &[u64] {
        self.prefix_hashes.get_or_init(|| hasher.hashes(self.prompt()))
    }

    /// Engine metrics of `pod`, or why there are none.
    pub fn pod_metrics(&self, pod: &PodInfo) -> Result<Arc<PodMetrics>, Unscored> {
        match self.metrics.reading_of(pod) {
            Reading::Fresh(metrics) => Ok(metrics),
            Reading::Stale => Err(Unscored::MetricsStale),
            Reading::Missing => Err(Unscored::MetricsMissing),
        }
    }
}

/// Token counts of a finished answer, as reported in its `usage`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Called once when the response ends, with its usage if it reported one.
pub struct UsageCallback(Box<dyn FnOnce(Option<TokenUsage>) + Send + Sync>);

impl UsageCallback {
    pub fn new(f: impl FnOnce(Option<TokenUsage>) + Send + Sync + 'static) -> Self {
        Self(Box::new(f))
    }

    pub fn call(self, usage: Option<TokenUsage>) {
        (self.0)(usage)
    }
}

impl std::fmt::Debug for UsageCallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UsageCallback")
    }
}

/// The outcome of routing: the chosen candidate and what goes back to the
/// proxy with it.
#[derive(Debug, Default)]
pub struct RouteDecision {
    /// Index into the candidates.
    pub index: usize,
    /// Response headers the strategy sets (`x-session-id`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Told the answer's token usage when it ends (`vtc-basic`).
    pub on_usage: Option<UsageCallback>,
}

/// One routing strategy.
pub trait Strategy: Send + Sync {
    /// The name clients use in `routing-strategy`; the metric label.
    fn name(&self) -> &'static str;

    /// Replaces `scores` with one score per candidate, lower is better, or
    /// says why the request cannot be scored.
    fn score(
        &self,
        request: &RouteRequest<'_>,
        candidates: &[Arc<PodInfo>],
        scores: &mut Vec<f64>,
    ) -> Result<(), Unscored>;

    /// Picks one of `candidates` (never empty, all ready). By default the
    /// lowest score, ties to fewer in flight, then at random.
    fn pick(&self, request: &RouteRequest<'_>, candidates: &[Arc<PodInfo>]) -> Result<usize, Unscored> {
        let mut scores = Vec::with_capacity(candidates.len());
        self.score(request, candidates, &mut scores)?;
        lowest(&scores, candidates).ok_or(Unscored::NotScorable)
    }

    /// Runs once the pod is chosen, whoever chose it (this strategy, a mix
    /// holding it, or the fallback): indexes learn, headers are set.
    fn chosen(&self, _request: &RouteRequest<'_>, _pod: &PodInfo, _decision: &mut RouteDecision) {}

    /// Whether the strategy picks the lowest of scores each pod has on its
    /// own (its in-flight count, its engine metrics), so that among many
    /// candidates a random sample finds a pod about as good as the best
    /// (power of k choices) at a fraction of the cost. Such strategies see
    /// only [`SAMPLE_SIZE`] random candidates once there are more than
    /// [`SAMPLE_ABOVE`]; the others (a prefix match, a session, a user's
    /// share) always see them all.
    fn samples_large_fleets(&self) -> bool {
        false
    }

    /// Whether the strategy may be part of a weighted mix.
    fn mixable(&self) -> bool {
        true
    }

    /// A strategy that may hold a request until a pod has room, or refuse
    /// it (`slo*`), routes it here; `None` routes it the usual way (the
    /// others always, `slo*` without a usable profile).
    fn admit(
        &self,
        _request: &RouteRequest<'_>,
        _candidates: &[Arc<PodInfo>],
    ) -> Option<Result<RouteDecision, Unroutable>> {
        None
    }

    /// A strategy that splits a request over two pods (`pd`) chooses the
    /// pair here; the others route to one pod and leave this as it is.
    fn plan_pair(
        &self,
        _request: &RouteRequest<'_>,
        _candidates: &[Arc<PodInfo>],
    ) -> Option<Result<pd::PdRoute, pd::PdRefusal>> {
        None
    }
}

/// Where a request goes.
#[derive(Debug)]
pub enum Route {
    /// One pod serves it, with what the strategy adds to the answer.
    Single { pod: Arc<PodInfo>, decision: RouteDecision },
    /// Prefilled on one pod, decoded on another of the same roleset (`pd`).
    Disaggregated(pd::PdPlan),
}

/// Why a request cannot be routed.
#[derive(Debug, PartialEq, Eq)]
pub enum Unroutable {
    /// No ready pod is left to choose from.
    NoCandidates,
    /// `pd`: no prefill/decode pair (or combined pod) can take the request.
    Pd(pd::PdRefusal),
    /// `slo*`: every pod is at capacity; await this, then route again.
    Queued(slo::SloWait),
    /// `slo*`: the request is refused.
    Slo(slo::SloRefusal),
}

/// Why a strategy name cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub enum StrategyError {
    /// Not a strategy name at all, or a malformed weighted mix.
    Unknown,
}

/// Counts fallbacks and logs each (strategy, reason) at most every ten seconds.
struct Fallbacks {
    metrics: RoutingMetrics,
    /// Per (strategy, reason): when it was last logged, and how many since.
    logged: Mutex<HashMap<(&'static str, Unscored), LogState>>,
}

const FALLBACK_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// When a fallback was last logged, and how many were not logged since.
type LogState = (Option<Instant>, u64);

impl Fallbacks {
    fn record(&self, strategy: &'static str, reason: Unscored) {
        self.metrics.fallback(strategy, reason.as_str());
        let suppressed = {
            let mut logged = self.logged.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = logged.entry((strategy, reason)).or_insert((None, 0));
            if entry.0.is_some_and(|at| at.elapsed() < FALLBACK_LOG_INTERVAL) {
                entry.1 += 1;
                return;
            }
            let suppressed = entry.1;
            *entry = (Some(Instant::now()), 0);
            suppressed
        };
        tracing::warn!(
            strategy,
            reason = reason.as_str(),
            suppressed,
            "routing strategy cannot score this request; routed by least-request instead"
        );
    }
}

/// The registry of strategies, and where requests are routed.
pub struct Router {
    strategies: HashMap<&'static str, Arc<dyn Strategy>>,
    /// The strategies' names, in registration order.
    names: Vec<&'static str>,
    /// Parsed weighted mixes by their text, so each distinct string is parsed once.
    mixes: Mutex<HashMap<String, Arc<dyn Strategy>>>,
    fallbacks: Arc<Fallbacks>,
    /// The prefix hasher every prefix-aware strategy shares.
    hasher: Arc<prefix_index::PrefixHasher>,
    /// What the strategies share with the other replicas.
    fleet: Arc<fleet::FleetState>,
    /// What the `slo*` strategies share.
    slo: Arc<slo::SloState>,
}

/// Distinct weighted-mix strings kept parsed; beyond this they are parsed per request.
const MAX_CACHED_MIXES: usize = 256;

impl Router {
    pub fn new(config: &RoutingConfig, metrics: &RoutingMetrics) -> Self {
        let hasher = Arc::new(prefix_index::PrefixHasher::new(config));
        let tokens = vtc_basic::TokenTracker::new(config.vtc_window());
        let prefix_history = Duration::from_secs(config.prefix_cache_eviction_duration_mins.saturating_mul(60));
        let fleet = Arc::new(fleet::FleetState {
            link: Arc::default(),
            prefix: Arc::new(prefix_cache::PrefixCache::index(config)),
            history: prefix_history.max(tokens.window()),
            tokens: Arc::new(tokens),
        });
        let slo = Arc::new(slo::SloState::default());
        let all = registered(&Build { config, hasher: &hasher, metrics, fleet: &fleet, slo: &slo });
        let fallbacks = Arc::new(Fallbacks { metrics: metrics.clone(), logged: Mutex::new(HashMap::new()) });
        Self {
            names: all.iter().map(|s| s.name()).collect(),
            strategies: all.into_iter().map(|s| (s.name(), s)).collect(),
            mixes: Mutex::default(),
            fallbacks,
            hasher,
            fleet,
            slo,
        }
    }

    /// What the `slo*` strategies share (their GPU profiles are read into it).
    pub fn slo_state(&self) -> &Arc<slo::SloState> {
        &self.slo
    }

    /// The routing state shared with the other replicas (see [`fleet`]).
    pub fn fleet_state(&self) -> &Arc<fleet::FleetState> {
        &self.fleet
    }

    /// The name of every strategy, in registration order (weighted mixes of
    /// them are accepted too).
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }

    /// The prefix hasher of the prefix-aware strategies.
    pub fn prefix_hasher(&self) -> Arc<prefix_index::PrefixHasher> {
        Arc::clone(&self.hasher)
    }

    /// Looks up a strategy by the name a client, profile or flag gave: one
    /// of [`Router::names`] or a weighted mix `name:weight,name:weight`.
    pub fn strategy(&self, name: &str) -> Result<Arc<dyn Strategy>, StrategyError> {
        if let Some(strategy) = self.strategies.get(name) {
            return Ok(Arc::clone(strategy));
        }
        if !(name.contains(',') || name.contains(':')) {
            return Err(StrategyError::Unknown);
        }
        if let Some(mix) = self.mixes.lock().unwrap_or_else(PoisonError::into_inner).get(name) {
            return Ok(Arc::clone(mix));
        }
        let mix = mix::WeightedMix::parse(name, &self.strategies, Arc::clone(&self.fallbacks))?;
        let mut cache = self.mixes.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() < MAX_CACHED_MIXES {
            cache.insert(name.to_owned(), Arc::clone(&mix));
        }
        Ok(mix)
    }

    /// Routes a request among `candidates` with `strategy`: to one pod, or
    /// to a prefill/decode pair when the strategy splits requests.
    pub fn route(
        &self,
        strategy: &dyn Strategy,
        request: &RouteRequest<'_>,
        candidates: &[Arc<PodInfo>],
    ) -> Result<Route, Unroutable> {
        if candidates.is_empty() {
            return Err(Unroutable::NoCandidates);
        }
        if let Some(plan) = strategy.plan_pair(request, candidates) {
            return match plan.map_err(Unroutable::Pd)? {
                pd::PdRoute::Pair(plan) => Ok(Route::Disaggregated(plan)),
                pd::PdRoute::Combined(pod) => Ok(Route::Single { pod, decision: RouteDecision::default() }),
            };
        }
        if let Some(admitted) = strategy.admit(request, candidates) {
            let decision = admitted?;
            let pod = candidates.get(decision.index).cloned().ok_or(Unroutable::NoCandidates)?;
            return Ok(Route::Single { pod, decision });
        }
        let decision = self.decide(strategy, request, candidates);
        let pod = candidates.get(decision.index).cloned().ok_or(Unroutable::NoCandidates)?;
        Ok(Route::Single { pod, decision })
    }

    /// Chooses among `candidates` (never empty) with `strategy`, falling back
    /// to least-request when it cannot score the request.
    pub fn decide(
        &self,
        strategy: &dyn Strategy,
        request: &RouteRequest<'_>,
        candidates: &[Arc<PodInfo>],
    ) -> RouteDecision {
        let sample = Sample::of(strategy, candidates);
        let pool = sample.as_ref().map_or(candidates, |s| s.pods.as_slice());
        let index = match strategy.pick(request, pool) {
            Ok(index) if index < pool.len() => index,
            Ok(_) => {
                self.fallbacks.record(strategy.name(), Unscored::NotScorable);
                least_in_flight(pool)
            }
            Err(reason) => {
                self.fallbacks.record(strategy.name(), reason);
                least_in_flight(pool)
            }
        };
        let index = sample.map_or(index, |s| s.indices[index]);
        let mut decision = RouteDecision { index, headers: Vec::new(), on_usage: None };
        if let Some(pod) = candidates.get(index) {
            strategy.chosen(request, pod, &mut decision);
        }
        decision
    }
}

/// Candidates past which a strategy that [samples](Strategy::samples_large_fleets)
/// sees a random sample instead of them all.
pub const SAMPLE_ABOVE: usize = 64;
/// Candidates in that sample: with 16 random choices the pick is, in
/// expectation, better than 94% of the fleet, and its cost does not grow
/// with the fleet.
pub const SAMPLE_SIZE: usize = 16;

/// A random sample of the candidates, and where each came from.
struct Sample {
    indices: Vec<usize>,
    pods: Vec<Arc<PodInfo>>,
}

impl Sample {
    /// The sample `strategy` chooses from, `None` when it sees every candidate.
    fn of(strategy: &dyn Strategy, candidates: &[Arc<PodInfo>]) -> Option<Self> {
        if candidates.len() <= SAMPLE_ABOVE || !strategy.samples_large_fleets() {
            return None;
        }
        let indices = rand::seq::index::sample(&mut rand::rng(), candidates.len(), SAMPLE_SIZE).into_vec();
        let pods: Vec<Arc<PodInfo>> = indices.iter().map(|&i| Arc::clone(&candidates[i])).collect();
        // The strategy reads each sampled pod's load: with a large fleet
        // few are still in cache, so start fetching them all now.
        std::hint::black_box(pods.iter().fold(0u64, |sum, pod| sum.wrapping_add(pod.load.warm())));
        Some(Self { indices, pods })
    }
}

/// The name of every strategy, in registration order.
pub fn strategy_names() -> Vec<&'static str> {
    let metrics = RoutingMetrics::register(&mut prometheus_client::registry::Registry::default(), None);
    Router::new(&RoutingConfig::default(), &metrics).names().to_vec()
}

/// Index of the pod with the fewest requests in flight, the fleet's as this
/// replica sees them ([`PodLoad::routing_load`](crate::discovery::PodLoad::routing_load));
/// ties go to this replica's share of the candidates ([`fleet::turn_of`]),
/// then at random, so equal pods share the load instead of the first one
/// taking it all.
pub(crate) fn least_in_flight(candidates: &[Arc<PodInfo>]) -> usize {
    let turn = fleet::turn_of();
    let now = LoadClock::now();
    let mut least = Lowest::new();
    for (i, pod) in candidates.iter().enumerate() {
        least.offer((pod.load.routing_load_at(now), turn.not_mine(i, candidates.len())), i);
    }
    least.into_item().unwrap_or(0)
}

/// Index of the lowest score; scores within a hair of each other tie, and
/// ties go to fewer in flight, then to this replica's share of the
/// candidates, then at random. `None` when `scores` does not hold one
/// finite score per candidate.
pub(crate) fn lowest(scores: &[f64], candidates: &[Arc<PodInfo>]) -> Option<usize> {
    if scores.len() != candidates.len() || scores.iter().any(|s| s.is_nan()) {
        return None;
    }
    let min = scores.iter().copied().fold(f64::INFINITY, f64::min);
    let tolerance = 1e-9 * min.abs().max(1.0);
    let turn = fleet::turn_of();
    let now = LoadClock::now();
    let mut least = Lowest::new();
    for (i, (score, pod)) in scores.iter().zip(candidates).enumerate() {
        if *score <= min + tolerance {
            least.offer((pod.load.routing_load_at(now), turn.not_mine(i, candidates.len())), i);
        }
    }
    least.into_item()
}

/// Scores in whole steps above the lowest. Engine metrics are up to a scrape
/// interval old and every request routed since is missing from them, so
/// strategies compare them at a resolution below which differences are
/// noise: pods within a step of the best tie and the live in-flight count
/// decides, instead of every request herding onto whichever pod read lowest.
pub(crate) fn coarsen(scores: &mut [f64], step: f64) {
    let min = scores.iter().copied().fold(f64::INFINITY, f64::min);
    if step > 0.0 && min.is_finite() {
        for score in scores.iter_mut() {
            *score = ((*score - min) / step).floor();
        }
    }
}

/// Scores every candidate from its fresh engine metrics; a candidate whose
/// metrics are stale, missing, or lack what `score` reads makes the request
/// unscorable (the router falls back rather than guess).
pub(crate) fn score_by_metrics(
    request: &RouteRequest<'_>,
    candidates: &[Arc<PodInfo>],
    scores: &mut Vec<f64>,
    score: impl Fn(&Gauges, &PodInfo) -> Option<f64>,
) -> Result<(), Unscored> {
    scores.clear();
    for pod in candidates {
        let scored =
            request.metrics.read_fresh(pod, |metrics| score(metrics, pod)).map_err(|unfresh| match unfresh {
                Unfresh::Stale => Unscored::MetricsStale,
                Unfresh::Missing => Unscored::MetricsMissing,
            })?;
        scores.push(scored.filter(|s| s.is_finite()).ok_or(Unscored::MetricsMissing)?);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::discovery::{PodLoad, Role};
    use std::collections::BTreeMap;

    /// A ready pod named `p<i>` with `in_flight` requests running.
    pub fn pod(i: u16, in_flight: usize) -> (Arc<PodInfo>, Vec<crate::discovery::InFlightGuard>) {
        let load = Arc::new(PodLoad::default());
        let guards = (0..in_flight).map(|_| load.start()).collect();
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], 9000 + i).into();
        let info = PodInfo {
            key: format!("default/p{i}"),
            name: format!("p{i}"),
            namespace: "default".into(),
            model: "m".into(),
            addr: Some(addr),
            addr_text: addr.to_string(),
            metric_port: 9000 + i,
            engine: "vllm".into(),
            roleset: None,
            role: Role::Combined,
            labels: BTreeMap::new(),
            config_annotation: None,
            pd: Default::default(),
            custom_paths: Vec::new(),
            data_parallel: 1,
            ready: true,
            load,
            series: Default::default(),
        };
        (Arc::new(info), guards)
    }

    /// `n` idle pods `p0..p<n>` (their in-flight guards are dropped).
    pub fn pods(n: u16) -> Vec<Arc<PodInfo>> {
        (0..n).map(|i| pod(i, 0).0).collect()
    }

    /// The model name tests route for.
    pub fn model() -> Arc<str> {
        Arc::from("m")
    }

    /// Engine metrics scraped just now, filled in by `fill`.
    pub fn fresh(fill: impl FnOnce(&mut PodMetrics)) -> PodMetrics {
        let mut metrics = PodMetrics::empty(Instant::now());
        fill(&mut metrics);
        metrics
    }

    /// Engine metrics scraped a minute ago (past any staleness cut-off).
    pub fn stale(fill: impl FnOnce(&mut PodMetrics)) -> PodMetrics {
        let now = Instant::now();
        let mut metrics = PodMetrics::empty(now.checked_sub(Duration::from_secs(60)).unwrap_or(now));
        fill(&mut metrics);
        metrics
    }

    /// A view holding `metrics[i]` for pod `p<i>` (`None`: never scraped).
    pub fn view(metrics: Vec<Option<PodMetrics>>) -> MetricsView {
        let readings = metrics.into_iter().enumerate().filter_map(|(i, m)| Some((format!("default/p{i}"), m?)));
        MetricsView::fixed(readings, Duration::from_secs(2))
    }

    /// A router with default settings and throw-away metrics.
    pub fn router() -> Router {
        Router::new(&RoutingConfig::default(), &crate::metrics::Metrics::new().routing)
    }

    /// How often each of `n` pods is chosen over `rounds` picks.
    pub fn spread(n: usize, rounds: usize, mut pick: impl FnMut() -> usize) -> Vec<usize> {
        let mut seen = vec![0; n];
        for _ in 0..rounds {
            seen[pick()] += 1;
        }
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    /// AIBrix's strategy names, every one implemented.
    const AIBRIX_STRATEGIES: &[&str] = &[
        "random",
        "least-request",
        "least-busy-time",
        "least-latency",
        "least-kv-cache",
        "least-gpu-cache",
        "least-utilization",
        "throughput",
        "power-of-two",
        "prefix-cache",
        "prefix-cache-preble",
        "vtc-basic",
        "session-affinity",
        "pd",
        "slo",
        "slo-pack-load",
        "slo-least-load",
        "slo-least-load-pulling",
    ];

    #[test]
    fn every_contract_name_is_available() {
        let router = router();
        assert_eq!(router.names(), AIBRIX_STRATEGIES, "the registry holds exactly AIBrix's strategies");
        assert_eq!(strategy_names(), AIBRIX_STRATEGIES);
        for name in AIBRIX_STRATEGIES {
            assert_eq!(router.strategy(name).map(|s| s.name()).ok(), Some(*name));
        }
        assert_eq!(router.strategy("nope").err(), Some(StrategyError::Unknown));
        assert_eq!(router.strategy("Random").err(), Some(StrategyError::Unknown));
        assert_eq!(router.strategy("least-request:1,throughput:2").map(|s| s.name()).ok(), Some("weighted-mix"));
        assert_eq!(router.strategy("least-request:1,bogus:2").err(), Some(StrategyError::Unknown));
        assert_eq!(router.strategy("least-request:x").err(), Some(StrategyError::Unknown));
    }

    #[test]
    fn mixes_are_parsed_once_per_distinct_string() {
        let router = router();
        let a = router.strategy("least-request:1,least-kv-cache:1").expect("valid");
        let b = router.strategy("least-request:1,least-kv-cache:1").expect("valid");
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn lowest_breaks_ties_by_in_flight_then_chance() {
        let (a, _ga) = pod(0, 2);
        let (b, _gb) = pod(1, 0);
        let (c, _gc) = pod(2, 0);
        let pods = [a, b, c];
        assert_eq!(lowest(&[1.0, 1.0, 2.0], &pods), Some(1), "tie on score, fewer in flight wins");
        let seen = spread(3, 300, || lowest(&[1.0, 1.0, 1.0], &pods).expect("a pick"));
        assert_eq!(seen[0], 0);
        assert!(seen[1] > 100 && seen[2] > 100, "{seen:?}");
        assert_eq!(lowest(&[1.0, f64::NAN, 2.0], &pods), None);
        assert_eq!(lowest(&[1.0], &pods), None, "one score per candidate");
    }

    #[test]
    fn unscorable_requests_fall_back_to_least_request_and_are_counted() {
        let metrics = crate::metrics::Metrics::new();
        let router = Router::new(&RoutingConfig::default(), &metrics.routing);
        let (busy, _g) = pod(0, 3);
        let pods = [busy, pod(1, 0).0];
        let model = model();
        // No engine metrics at all: least-kv-cache cannot score.
        let request = RouteRequest::new(&model, b"{}");
        let strategy = router.strategy("least-kv-cache").expect("registered");
        for _ in 0..5 {
            assert_eq!(router.decide(strategy.as_ref(), &request, &pods).index, 1);
        }
        let text = metrics.render();
        assert!(
            text.contains(
                r#"aibrix_gateway_routing_fallbacks_total{strategy="least-kv-cache",reason="metrics_missing"} 5"#
            ),
            "{text}"
        );
    }

    #[test]
    fn a_large_fleet_is_sampled_and_keeps_load_even() {
        let router = router();
        let pods = pods(1000);
        let model = model();
        let request = RouteRequest::new(&model, b"{}");
        let strategy = router.strategy("least-request").expect("registered");
        // 5,000 requests held open, routed one after another: an exact scan
        // gives every pod exactly five; sixteen random choices come close.
        let mut held = Vec::new();
        for _ in 0..5000 {
            let Route::Single { pod, .. } = router.route(strategy.as_ref(), &request, &pods).expect("routes") else {
                panic!("one pod");
            };
            held.push(pod.load.start());
        }
        let loads: Vec<usize> = pods.iter().map(|p| p.load.in_flight()).collect();
        let (min, max) = (loads.iter().min().copied(), loads.iter().max().copied());
        assert!(min >= Some(3) && max <= Some(7), "uneven: {min:?}..{max:?}");
        // Strategies that need every candidate are not sampled: prefix-cache
        // keeps every pod in view, the mix of sampled strategies is sampled.
        assert!(router.strategy("prefix-cache").is_ok_and(|s| !s.samples_large_fleets()));
        assert!(router.strategy("least-request:1,least-kv-cache:2").is_ok_and(|s| s.samples_large_fleets()));
        assert!(router.strategy("least-request:1,prefix-cache:2").is_ok_and(|s| !s.samples_large_fleets()));
    }

    #[test]
    fn a_sample_is_only_taken_past_the_threshold_and_maps_back_to_the_candidates() {
        let router = router();
        let strategy = router.strategy("least-request").expect("registered");
        let small = pods(SAMPLE_ABOVE as u16);
        assert!(Sample::of(strategy.as_ref(), &small).is_none());
        // One idle pod among busy ones: a full scan always finds it.
        let mut guards = Vec::new();
        let large: Vec<Arc<PodInfo>> = (0..200u16)
            .map(|i| {
                let (pod, g) = pod(i, usize::from(i != 7));
                guards.extend(g);
                pod
            })
            .collect();
        let sample = Sample::of(strategy.as_ref(), &large).expect("sampled");
        assert_eq!(sample.pods.len(), SAMPLE_SIZE);
        for (pod, &i) in sample.pods.iter().zip(&sample.indices) {
            assert!(Arc::ptr_eq(pod, &large[i]), "sample index maps back to its candidate");
        }
        let model = model();
        let request = RouteRequest::new(&model, b"{}");
        let picks = spread(200, 400, || router.decide(strategy.as_ref(), &request, &large).index);
        // Sampled: the idle pod is chosen whenever drawn (16 of 200, 8%), not always.
        assert!((10..=80).contains(&picks[7]), "{}", picks[7]);
    }

    #[test]
    fn request_reads_headers_and_extracts_the_prompt_once() {
        let mut map = HeaderMap::new();
        map.insert("user", HeaderValue::from_static(" alice "));
        map.insert("x-session-id", HeaderValue::from_static(""));
        map.insert("x-aibrix-session-key", HeaderValue::from_static("k1"));
        let model = model();
        let extracted = format!("extracted {}", br#"{"prompt":"hi"}"#.len());
        let source = || extracted.as_str();
        let request = RouteRequest::new(&model, br#"{"prompt":"hi"}"#).with_headers(&map).with_prompt_source(&source);
        assert_eq!(request.user, Some("alice"));
        assert_eq!(request.session_id, None, "blank header is absent");
        assert_eq!(request.session_key, Some("k1"));
        assert_eq!(request.prompt(), "extracted 15");
    }
}
