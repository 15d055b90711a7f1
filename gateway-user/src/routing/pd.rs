//! `pd`: prefill/decode disaggregation, as AIBrix's `pd` strategy. A request is
//! prefilled on one pod and decoded on another, and the two must share a KV
//! transfer domain: a roleset (pod label `roleset-name`, role from
//! `role-name`).
//!
//! Choosing a pair runs AIBrix's steps in AIBrix's order:
//!
//! 1. Rolesets with at least one ready prefill and one ready decode pod are
//!    eligible, so a roleset half-way through a rollout is skipped rather
//!    than half used. A roleset whose pods name different engines
//!    (`model.aibrix.ai/engine`) is skipped too: its two halves could not
//!    talk.
//! 2. With prompt-length bucketing on, a PD pod takes only prompts in the
//!    range of its own profile (`promptLenBucketMinLength`..`MaxLength`), a
//!    roleset only when both halves fit; a prompt no complete roleset fits
//!    goes to a combined pod (`combined: true`), which also takes the
//!    request when it is idle and the PD pods are backed up.
//! 3. A prefill spread past `--prefill-load-imbalance-min-spread` sends the
//!    request to the least busy prefill pod; a decode spread (in requests,
//!    generation throughput, or time to drain) to the least busy decode pod.
//! 4. Otherwise each roleset's best prefill pod and best decode pod are
//!    scored by the prefill and decode policies, and the roleset whose pair
//!    costs least, each half relative to the worst, wins; ties at random.
//!
//! A pod's load is its requests in flight across the fleet
//! ([`crate::discovery::PodLoad::routing_load`]): for a prefill pod, the
//! prefills; for a decode pod, its decodes, counted from the moment it is
//! chosen. Engine readings (throughput, KV cache, drain rate) come from the
//! scrape.
//!
//! This module only chooses ([`super::Router::route`] returns the pair as
//! [`super::Route::Disaggregated`], a combined pod as a single route); the
//! two requests, and the bodies each engine needs, are the proxy's.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::prefix_index::{PrefixHasher, PrefixIndex, pod_id};
use super::ties::{Cost, Lowest};
use super::{RouteRequest, RoutingConfig, Strategy, Unscored};
use crate::discovery::pod::{ROLE_LABEL, ROLESET_LABEL};
use crate::discovery::{PodInfo, Role};
use crate::engine_metrics::{PodMetrics, Reading};
use crate::profiles::PdProfile;

/// The strategy name.
pub const NAME: &str = "pd";

/// How prefill pods are scored (`AIBRIX_PREFILL_SCORE_POLICY`, or a
/// profile's `prefillScorePolicy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillPolicy {
    /// `(100 − prefix match %) × 0.1 + prefills / most prefills`.
    PrefixCache,
    /// Prefills in flight.
    LeastRequest,
    /// Estimated time to first token: queue, cached prefix and the rest.
    Conductor,
}

impl PrefillPolicy {
    pub fn name(self) -> &'static str {
        match self {
            Self::PrefixCache => "prefix_cache",
            Self::LeastRequest => "least_request",
            Self::Conductor => "conductor",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [Self::PrefixCache, Self::LeastRequest, Self::Conductor].into_iter().find(|p| p.name() == name)
    }
}

/// How decode pods are scored (`AIBRIX_DECODE_SCORE_POLICY`, or a
/// profile's `decodeScorePolicy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodePolicy {
    /// `(running share + unused throughput share) / free KV cache share`.
    LoadBalancing,
    /// Requests running.
    LeastRequest,
    /// Estimated time between tokens once the request joins.
    Conductor,
}

impl DecodePolicy {
    pub fn name(self) -> &'static str {
        match self {
            Self::LoadBalancing => "load_balancing",
            Self::LeastRequest => "least_request",
            Self::Conductor => "conductor",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        let name = name.trim().to_ascii_lowercase();
        [Self::LoadBalancing, Self::LeastRequest, Self::Conductor].into_iter().find(|p| p.name() == name)
    }
}

/// vLLM's KV connector between a prefill and a decode pod (pod label
/// `model.aibrix.ai/kv-connector-type`, else `AIBRIX_KV_CONNECTOR_TYPE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvConnector {
    /// `kv_transfer_params` out of the prefill answer into the decode body.
    Shfs,
    /// The whole prefill answer into the decode body as `disagg_prefill_resp`.
    Nixl,
    /// Nothing passed: the engines find each other.
    Mooncake,
}

impl KvConnector {
    pub fn name(self) -> &'static str {
        match self {
            Self::Shfs => "shfs",
            Self::Nixl => "nixl",
            Self::Mooncake => "mooncake",
        }
    }

    /// A connector label's value, in any case; `None` for an unknown one.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim().to_ascii_lowercase();
        [Self::Shfs, Self::Nixl, Self::Mooncake].into_iter().find(|c| c.name() == value)
    }
}

/// `pd`'s settings, under AIBrix's environment variable names.
#[derive(Clone, Debug, PartialEq)]
pub struct PdSettings {
    /// `AIBRIX_PROMPT_LENGTH_BUCKETING`: PD pods take only prompts in their
    /// profile's length range.
    pub prompt_length_bucketing: bool,
    pub prefill_score_policy: PrefillPolicy,
    pub decode_score_policy: DecodePolicy,
    /// Prefills in flight between the busiest and the idlest prefill pod
    /// past which the idlest takes the request.
    pub prefill_imbalance_min_spread: u32,
    /// Requests between the busiest and the idlest decode pod at which the
    /// idlest takes the request.
    pub decode_imbalance_min_spread: f64,
    /// Generation throughput (tokens/s) between decode pods past which the
    /// slowest takes the request.
    pub decode_throughput_imbalance_min_spread: f64,
    /// Ratio of the longest to the shortest time to drain a decode pod's
    /// requests past which the shortest takes the request.
    pub decode_score_ratio_threshold: f64,
    /// `load_balancing`: weight of the running-request share.
    pub decode_lb_weight_running: f64,
    /// `load_balancing`: weight of the throughput share.
    pub decode_lb_weight_throughput: f64,
    /// vLLM's KV connector for pods without the label.
    pub kv_connector: KvConnector,
}

impl Default for PdSettings {
    /// AIBrix's defaults.
    fn default() -> Self {
        Self {
            prompt_length_bucketing: false,
            prefill_score_policy: PrefillPolicy::PrefixCache,
            decode_score_policy: DecodePolicy::LoadBalancing,
            prefill_imbalance_min_spread: 16,
            decode_imbalance_min_spread: 16.0,
            decode_throughput_imbalance_min_spread: 2048.0,
            decode_score_ratio_threshold: 1.5,
            decode_lb_weight_running: 1.0,
            decode_lb_weight_throughput: 1.0,
            kv_connector: KvConnector::Shfs,
        }
    }
}

/// What the prefill and decode requests of a pair carry, by the roleset's
/// engine (and, for vLLM, the prefill pod's KV connector).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handshake {
    Vllm(KvConnector),
    /// The prefill runs alongside the decode, both told where the prefill
    /// pod's bootstrap server is.
    Sglang {
        bootstrap_port: u16,
    },
    /// `disaggregated_params`: context only, then generation only.
    TrtLlm,
    /// Another engine: the prefill's one-token budget, nothing passed on.
    Plain,
}

impl Handshake {
    fn of(engine: &str, prefill: &PodInfo, default_connector: KvConnector) -> Self {
        if engine.eq_ignore_ascii_case("vllm") {
            let connector = prefill.pd.kv_connector.as_deref().and_then(KvConnector::parse);
            Self::Vllm(connector.unwrap_or(default_connector))
        } else if engine.eq_ignore_ascii_case("sglang") {
            Self::Sglang { bootstrap_port: prefill.pd.bootstrap_port }
        } else if engine.eq_ignore_ascii_case("trtllm") {
            Self::TrtLlm
        } else {
            Self::Plain
        }
    }

    /// `vllm/shfs`, `sglang`, ... for logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vllm(KvConnector::Shfs) => "vllm/shfs",
            Self::Vllm(KvConnector::Nixl) => "vllm/nixl",
            Self::Vllm(KvConnector::Mooncake) => "vllm/mooncake",
            Self::Sglang { .. } => "sglang",
            Self::TrtLlm => "trtllm",
            Self::Plain => "other",
        }
    }
}

/// Where one request's two halves go.
#[derive(Clone, Debug)]
pub struct PdPlan {
    pub roleset: String,
    pub prefill: Arc<PodInfo>,
    pub decode: Arc<PodInfo>,
    pub handshake: Handshake,
}

/// What `pd` decided.
#[derive(Clone, Debug)]
pub enum PdRoute {
    Pair(PdPlan),
    /// A combined pod serves the whole request (bucketing's fallback).
    Combined(Arc<PodInfo>),
}

/// Why `pd` cannot route a request: AIBrix's messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PdRefusal {
    /// No roleset has a ready prefill and a ready decode pod (and no
    /// combined pod stands in): how many ready pods of each role there are.
    NotReady { prefill: usize, decode: usize },
    /// Bucketing: no complete roleset fits the prompt and no combined pod does.
    NoBucket { prompt_tokens: i64 },
    /// Every roleset left mixes engines.
    InconsistentEngines(String),
    /// The profile names a decode policy that does not exist.
    UnknownDecodePolicy(String),
    /// Every pod left was skipped in scoring.
    NoPair,
}

impl fmt::Display for PdRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotReady { prefill, decode } => write!(
                f,
                "no roleset has a ready prefill and a ready decode pod (ready prefill pods: {prefill}, ready decode pods: {decode})"
            ),
            Self::NoBucket { prompt_tokens } => write!(
                f,
                "no prompt-length bucket matches prompt length {prompt_tokens} and no combined pods available"
            ),
            Self::InconsistentEngines(detail) => write!(f, "inconsistent LLM engines detected: {detail}"),
            Self::UnknownDecodePolicy(name) => write!(
                f,
                "unknown decodeScorePolicy {name:?} in routingConfig (valid: [load_balancing least_request conductor])"
            ),
            Self::NoPair => f.write_str("no roleset has a prefill and a decode pod left after scoring"),
        }
    }
}

/// The ready prefill and decode pods of one roleset.
#[derive(Debug)]
struct Roleset<'a> {
    name: &'a str,
    prefill: Vec<&'a Arc<PodInfo>>,
    decode: Vec<&'a Arc<PodInfo>>,
}

impl Roleset<'_> {
    fn is_eligible(&self) -> bool {
        !self.prefill.is_empty() && !self.decode.is_empty()
    }

    /// Two pods naming different engines, if the roleset has any.
    fn mixed_engines(&self) -> Option<String> {
        let mut pods = self.prefill.iter().chain(&self.decode);
        let first = pods.next()?;
        let other = pods.find(|p| !p.engine.eq_ignore_ascii_case(&first.engine))?;
        Some(format!("pod {} has {}, pod {} has {}", first.name, first.engine, other.name, other.engine))
    }
}

/// Groups the ready prefill and decode pods among `candidates` by roleset,
/// ordered by roleset name. Pods without a roleset label are in none.
fn rolesets(candidates: &[Arc<PodInfo>]) -> Vec<Roleset<'_>> {
    let mut sets: Vec<Roleset<'_>> = Vec::new();
    for pod in candidates.iter().filter(|p| p.ready && p.role != Role::Combined) {
        let Some(name) = pod.roleset.as_deref() else { continue };
        let index = match sets.iter().position(|s| s.name == name) {
            Some(index) => index,
            None => {
                sets.push(Roleset { name, prefill: Vec::new(), decode: Vec::new() });
                sets.len() - 1
            }
        };
        let Some(set) = sets.get_mut(index) else { continue };
        match pod.role {
            Role::Prefill => set.prefill.push(pod),
            Role::Decode => set.decode.push(pod),
            Role::Combined => {}
        }
    }
    sets.sort_by(|a, b| a.name.cmp(b.name));
    sets
}

/// One candidate pod of a half, with its roleset and engine reading.
struct Candidate<'a> {
    roleset: &'a str,
    pod: &'a Arc<PodInfo>,
    reading: Option<Arc<PodMetrics>>,
}

impl Candidate<'_> {
    fn load(&self) -> f64 {
        self.pod.load.routing_load() as f64
    }
}

/// What AIBrix's prefill policies cost a prompt of `blocks` hashed blocks.
struct PrefillScorer<'a> {
    policy: PrefillPolicy,
    /// Prompt tokens (conductor).
    tokens: f64,
    blocks: usize,
    depths: &'a [usize],
}

/// A decode pod's inputs to the decode policies.
struct DecodeInput {
    running: f64,
    throughput: f64,
    free_kv: f64,
    max_running: f64,
    max_throughput: f64,
    max_free_kv: f64,
}

/// The `pd` strategy: chooses the prefill/decode pair and remembers prompt
/// prefixes per prefill pod.
pub struct PdRouter {
    hasher: Arc<PrefixHasher>,
    index: PrefixIndex,
    settings: PdSettings,
    deviation_factor: f64,
}

impl PdRouter {
    pub fn new(config: &RoutingConfig, hasher: Arc<PrefixHasher>) -> Self {
        Self {
            hasher,
            index: PrefixIndex::new(
                usize::try_from(config.prefix_cache_block_number).unwrap_or(usize::MAX),
                Duration::from_secs(config.prefix_cache_eviction_duration_mins.saturating_mul(60)),
            ),
            settings: config.pd.clone(),
            deviation_factor: config.prefix_cache_standard_deviation_factor,
        }
    }

    /// Chooses a prefill and a decode pod of one eligible roleset among
    /// `candidates` (or a combined pod), and records the prompt's prefix
    /// for the prefill pod.
    pub fn plan(&self, request: &RouteRequest<'_>, candidates: &[Arc<PodInfo>]) -> Result<PdRoute, PdRefusal> {
        let settings = &self.settings;
        let profile = request.profile_name();
        let pod_profile = |pod: &PodInfo| -> Option<PdProfile> { pod.pd.profiles.as_ref()?.get(profile).cloned() };
        let bucketing = settings.prompt_length_bucketing;
        let prompt_tokens = if bucketing { request.prompt_tokens() } else { 0 };
        let fits = |pod: &PodInfo| pod_profile(pod).is_none_or(|p| p.bucket.fits(prompt_tokens));
        let reading = |pod: &PodInfo| match request.metrics.reading_of(pod) {
            Reading::Fresh(metrics) => Some(metrics),
            Reading::Stale | Reading::Missing => None,
        };
        let candidate = |roleset, pod| Candidate { roleset, pod, reading: reading(pod) };

        let sets = rolesets(candidates);
        let mut mixed = None;
        let mut prefill = Vec::new();
        let mut decode = Vec::new();
        let mut bucket_prefill = Vec::new();
        let mut bucket_decode = Vec::new();
        for set in sets.iter().filter(|s| s.is_eligible()) {
            if let Some(detail) = set.mixed_engines() {
                mixed.get_or_insert(detail);
                continue;
            }
            prefill.extend(set.prefill.iter().map(|pod| candidate(set.name, pod)));
            decode.extend(set.decode.iter().map(|pod| candidate(set.name, pod)));
            if bucketing {
                let fit_prefill: Vec<_> = set.prefill.iter().filter(|p| fits(p)).collect();
                let fit_decode: Vec<_> = set.decode.iter().filter(|p| fits(p)).collect();
                if !fit_prefill.is_empty() && !fit_decode.is_empty() {
                    bucket_prefill.extend(fit_prefill.into_iter().map(|pod| candidate(set.name, pod)));
                    bucket_decode.extend(fit_decode.into_iter().map(|pod| candidate(set.name, pod)));
                }
            }
        }
        // A combined pod carries a roleset and a role that is neither
        // prefill nor decode, and says `combined` in its own profile.
        let combined: Vec<&Arc<PodInfo>> = if bucketing {
            candidates
                .iter()
                .filter(|p| {
                    p.ready
                        && p.role == Role::Combined
                        && p.labels.contains_key(ROLESET_LABEL)
                        && p.labels.contains_key(ROLE_LABEL)
                        && pod_profile(p).is_some_and(|profile| profile.combined && profile.bucket.fits(prompt_tokens))
                })
                .collect()
        } else {
            Vec::new()
        };
        let combined_available = !combined.is_empty();
        if (prefill.is_empty() || decode.is_empty()) && !combined_available {
            if let Some(detail) = mixed {
                return Err(PdRefusal::InconsistentEngines(detail));
            }
            return Err(PdRefusal::NotReady {
                prefill: sets.iter().map(|s| s.prefill.len()).sum(),
                decode: sets.iter().map(|s| s.decode.len()).sum(),
            });
        }
        if bucketing {
            if bucket_prefill.is_empty() || bucket_decode.is_empty() {
                if combined_available {
                    let pick = rand::random_range(0..combined.len());
                    return combined.get(pick).map(|pod| PdRoute::Combined(Arc::clone(pod))).ok_or(PdRefusal::NoPair);
                }
                return Err(PdRefusal::NoBucket { prompt_tokens });
            }
            if let Some(pod) = self.combined_when_backed_up(&bucket_prefill, &bucket_decode, &combined, &reading) {
                return Ok(PdRoute::Combined(Arc::clone(pod)));
            }
            prefill = bucket_prefill;
            decode = bucket_decode;
        }

        // Imbalance: the least busy pod of a half takes the request, and
        // the other half keeps to its roleset.
        if let Some(pick) = self.prefill_imbalance(&prefill) {
            prefill.swap(0, pick);
            prefill.truncate(1);
            let roleset = prefill.first().map_or("", |c| c.roleset);
            decode.retain(|c| c.roleset == roleset);
        }
        let inputs = self.decode_inputs(&decode);
        if let Some(pick) = self.decode_imbalance(&decode, &inputs) {
            decode.swap(0, pick);
            decode.truncate(1);
            let roleset = decode.first().map_or("", |c| c.roleset);
            if prefill.iter().any(|c| c.roleset == roleset) {
                prefill.retain(|c| c.roleset == roleset);
            }
        }

        let (prefill_policy, decode_policy) = self.policies(request)?;
        let hashes: &[u64] =
            if prefill_policy == PrefillPolicy::LeastRequest { &[] } else { request.prefix_hashes(&self.hasher) };
        let prefill_best = self.score_prefill(request, &prefill, prefill_policy, hashes);
        let decode_best = self.score_decode(&decode, decode_policy);
        let mut best = Lowest::new();
        for (roleset, (prefill_score, prefill_pod)) in &prefill_best.per_roleset {
            let Some((_, (decode_score, decode_pod))) = decode_best.per_roleset.iter().find(|(r, _)| r == roleset)
            else {
                continue;
            };
            let cost = prefill_score / prefill_best.max + decode_score / decode_best.max;
            // An infinite score (a pod reporting absurd times) makes NaN: never a winner.
            if cost.is_finite() {
                best.offer(Cost(cost), (*roleset, *prefill_pod, *decode_pod));
            }
        }
        let (roleset, prefill, decode) = best.into_item().ok_or(PdRefusal::NoPair)?;
        if !hashes.is_empty() {
            self.index.record(hashes, pod_id(&prefill.key));
        }
        let engine = &prefill.engine;
        Ok(PdRoute::Pair(PdPlan {
            roleset: roleset.to_owned(),
            prefill: Arc::clone(prefill),
            decode: Arc::clone(decode),
            handshake: Handshake::of(engine, prefill, settings.kv_connector),
        }))
    }

    /// The profile's policies over the flags': an unknown prefill policy
    /// keeps the flag's, an unknown decode policy refuses the request.
    fn policies(&self, request: &RouteRequest<'_>) -> Result<(PrefillPolicy, DecodePolicy), PdRefusal> {
        let profile = request.profile_routing().map(crate::profiles::ProfileRouting::pd).unwrap_or_default();
        let prefill = match profile.prefill_score_policy.as_deref() {
            None => self.settings.prefill_score_policy,
            Some(name) => PrefillPolicy::parse(name).unwrap_or(self.settings.prefill_score_policy),
        };
        let decode = match profile.decode_score_policy {
            None => self.settings.decode_score_policy,
            Some(name) => DecodePolicy::parse(&name).ok_or(PdRefusal::UnknownDecodePolicy(name))?,
        };
        Ok((prefill, decode))
    }

    /// Bucketing: a combined pod takes the request when one is nearly idle
    /// (its queue would drain in under a quarter second) while a PD pod is
    /// backed up (over a second); the least backed-up combined pod.
    fn combined_when_backed_up<'a>(
        &self,
        prefill: &[Candidate<'_>],
        decode: &[Candidate<'_>],
        combined: &[&'a Arc<PodInfo>],
        reading: &dyn Fn(&PodInfo) -> Option<Arc<PodMetrics>>,
    ) -> Option<&'a Arc<PodInfo>> {
        let backlog = |pod: &PodInfo| {
            let metrics = reading(pod);
            let waiting = metrics.as_ref().and_then(|m| m.waiting).unwrap_or(0.0);
            let drain = metrics.as_ref().and_then(|m| m.requests_finished_per_second).unwrap_or(0.0);
            waiting / drain
        };
        if !combined.iter().any(|pod| backlog(pod) < 0.25) {
            return None;
        }
        if !prefill.iter().chain(decode).any(|c| backlog(c.pod) > 1.0) {
            return None;
        }
        let mut best = Lowest::new();
        for pod in combined {
            let score = backlog(pod);
            if score < f64::MAX {
                best.offer(Cost(score), *pod);
            }
        }
        best.into_item()
    }

    /// The idlest prefill pod when prefills in flight spread past the limit.
    fn prefill_imbalance(&self, prefill: &[Candidate<'_>]) -> Option<usize> {
        let loads: Vec<f64> = prefill.iter().map(Candidate::load).collect();
        let (min, max) = min_max(&loads)?;
        if max - min <= f64::from(self.settings.prefill_imbalance_min_spread) {
            return None;
        }
        lowest_index(loads.iter().copied().enumerate())
    }

    fn decode_inputs(&self, decode: &[Candidate<'_>]) -> Vec<DecodeInput> {
        let mut inputs: Vec<DecodeInput> = decode
            .iter()
            .map(|c| {
                let usage = c.reading.as_ref().and_then(|m| m.kv_cache_usage).unwrap_or(0.0);
                let free = (100.0 - usage * 100.0).round();
                DecodeInput {
                    running: c.load(),
                    throughput: c.reading.as_ref().and_then(|m| m.generation_tokens_per_second).unwrap_or(0.0),
                    free_kv: if free <= 0.0 { 0.1 } else { free },
                    max_running: 1.0,
                    max_throughput: 1.0,
                    max_free_kv: 1.0,
                }
            })
            .collect();
        let max = |pick: fn(&DecodeInput) -> f64| inputs.iter().map(pick).fold(1.0, f64::max);
        let (max_running, max_throughput, max_free_kv) = (max(|i| i.running), max(|i| i.throughput), max(|i| i.free_kv));
        for input in &mut inputs {
            input.max_running = max_running;
            input.max_throughput = max_throughput;
            input.max_free_kv = max_free_kv;
        }
        inputs
    }

    /// The decode pod that takes the request when decode pods are out of
    /// balance, checked in AIBrix's order; only pods with a fresh engine
    /// reading take part.
    fn decode_imbalance(&self, decode: &[Candidate<'_>], inputs: &[DecodeInput]) -> Option<usize> {
        let s = &self.settings;
        let reporting = || decode.iter().zip(inputs).enumerate().filter(|(_, (c, _))| c.reading.is_some());
        let running: Vec<(usize, f64)> = reporting().map(|(i, (_, input))| (i, input.running)).collect();
        if let Some((min, max)) = min_max(&running.iter().map(|(_, r)| *r).collect::<Vec<_>>())
            && max - min >= s.decode_imbalance_min_spread
        {
            return lowest_index(running.into_iter());
        }
        let throughput: Vec<(usize, f64)> = reporting()
            .filter_map(|(i, (c, _))| Some((i, c.reading.as_ref()?.generation_tokens_per_second?)))
            .collect();
        if let Some((min, max)) = min_max(&throughput.iter().map(|(_, t)| *t).collect::<Vec<_>>())
            && max - min > s.decode_throughput_imbalance_min_spread
        {
            return lowest_index(throughput.into_iter());
        }
        let drain: Option<Vec<(usize, f64)>> = decode
            .iter()
            .zip(inputs)
            .enumerate()
            .map(|(i, (c, input))| {
                let rate = c.reading.as_ref()?.requests_finished_per_second.filter(|r| *r > 0.0)?;
                Some((i, input.running / rate.max(0.1)))
            })
            .collect();
        let drain = drain.filter(|d| !d.is_empty())?;
        let (min, max) = min_max(&drain.iter().map(|(_, t)| *t).collect::<Vec<_>>())?;
        (min > 0.0 && max / min > s.decode_score_ratio_threshold).then(|| lowest_index(drain.into_iter())).flatten()
    }

    /// Each roleset's best prefill pod by `policy`, skipping pods whose
    /// prefills in flight exceed the mean by more than the deviation
    /// factor's standard deviations.
    fn score_prefill<'a>(
        &self,
        request: &RouteRequest<'_>,
        prefill: &[Candidate<'a>],
        policy: PrefillPolicy,
        hashes: &[u64],
    ) -> Best<'a> {
        let loads: Vec<f64> = prefill.iter().map(Candidate::load).collect();
        let max_load = loads.iter().copied().fold(1.0, f64::max);
        let count = loads.len().max(1) as f64;
        let mean = loads.iter().sum::<f64>() / count;
        // The sample standard deviation, as AIBrix (and prefix-cache) take it.
        let deviation = if loads.len() > 1 {
            (loads.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (count - 1.0)).sqrt()
        } else {
            0.0
        };
        let ids: Vec<u64> = prefill.iter().map(|c| pod_id(&c.pod.key)).collect();
        let mut depths = Vec::with_capacity(ids.len());
        if !hashes.is_empty() {
            self.index.match_depths(hashes, &ids, &mut depths);
        }
        depths.resize(ids.len(), 0);
        let tokens = if policy == PrefillPolicy::Conductor { request.prompt_tokens() as f64 } else { 0.0 };
        let scorer = PrefillScorer { policy, tokens, blocks: hashes.len(), depths: &depths };
        let mut best = Best::new(1.0);
        for (i, (c, load)) in prefill.iter().zip(&loads).enumerate() {
            if *load > mean + self.deviation_factor * deviation {
                continue;
            }
            let score = scorer.score(i, *load, max_load, c.reading.as_deref());
            best.offer(c.roleset, score, c.pod);
        }
        best
    }

    /// Each roleset's best decode pod by `policy`. While some pods have an
    /// engine reading, a pod without one (just started) scores as an idle
    /// warm pod plus its requests.
    fn score_decode<'a>(&self, decode: &[Candidate<'a>], policy: DecodePolicy) -> Best<'a> {
        let inputs = self.decode_inputs(decode);
        let any_reading = decode.iter().any(|c| c.reading.is_some());
        let mut best = Best::new(0.01);
        for (c, input) in decode.iter().zip(&inputs) {
            if any_reading && c.reading.is_none() {
                best.offer(c.roleset, 1.0 + input.running, c.pod);
                continue;
            }
            let mut score = self.decode_score(policy, input);
            if score.is_nan() && policy != DecodePolicy::LoadBalancing {
                score = self.decode_score(DecodePolicy::LoadBalancing, input);
            }
            if !score.is_nan() {
                best.offer(c.roleset, score, c.pod);
            }
        }
        best
    }

    fn decode_score(&self, policy: DecodePolicy, input: &DecodeInput) -> f64 {
        match policy {
            DecodePolicy::LoadBalancing => {
                let running = input.running / input.max_running;
                let throughput = 1.0 - input.throughput / input.max_throughput;
                let free = input.free_kv / input.max_free_kv;
                (self.settings.decode_lb_weight_running * running
                    + self.settings.decode_lb_weight_throughput * throughput)
                    / free
            }
            DecodePolicy::LeastRequest => input.running,
            DecodePolicy::Conductor => {
                let between_tokens_ms = if input.throughput > 0.0 { 1000.0 / input.throughput } else { 20.0 };
                let estimate = between_tokens_ms * (1.0 + 1.0 / input.running.max(1.0));
                if 1.0 - input.free_kv / 100.0 > 0.9 { estimate * 1.5 } else { estimate }
            }
        }
    }
}

impl PrefillScorer<'_> {
    /// The score of the `i`-th prefill candidate with `load` prefills in flight.
    fn score(&self, i: usize, load: f64, max_load: f64, reading: Option<&PodMetrics>) -> f64 {
        let depth = self.depths.get(i).copied().unwrap_or(0);
        let matched_percent = if self.blocks == 0 { 0.0 } else { 100.0 * depth as f64 / self.blocks as f64 };
        match self.policy {
            PrefillPolicy::PrefixCache => (100.0 - matched_percent) * 0.1 + load / max_load,
            PrefillPolicy::LeastRequest => load,
            PrefillPolicy::Conductor => {
                let estimate_prefill = |tokens: f64| if tokens <= 0.0 { 0.0 } else { 0.001 * tokens.powf(1.5) + 5.0 };
                let matched = self.tokens * matched_percent / 100.0;
                let unmatched = self.tokens - matched;
                let mean_prefill_ms =
                    reading.and_then(|m| m.prefill_time).map_or_else(|| estimate_prefill(512.0), |s| s * 1000.0);
                let queue = if load > 0.0 { load * mean_prefill_ms } else { 0.0 };
                let prefix = if matched > 0.0 { 0.005 * matched + 1.0 } else { 0.0 };
                queue + prefix + estimate_prefill(unmatched)
            }
        }
    }
}

/// The best pod per roleset of one half, and the highest score of all
/// (at least `floor`), which each half's scores are divided by.
struct Best<'a> {
    per_roleset: Vec<(&'a str, (f64, &'a Arc<PodInfo>))>,
    max: f64,
    ties: Vec<u32>,
}

impl<'a> Best<'a> {
    fn new(floor: f64) -> Self {
        Self { per_roleset: Vec::new(), max: floor, ties: Vec::new() }
    }

    fn offer(&mut self, roleset: &'a str, score: f64, pod: &'a Arc<PodInfo>) {
        self.max = self.max.max(score);
        match self.per_roleset.iter().position(|(r, _)| *r == roleset) {
            None => {
                self.per_roleset.push((roleset, (score, pod)));
                self.ties.push(1);
            }
            Some(i) => {
                let (Some((_, best)), Some(ties)) = (self.per_roleset.get_mut(i), self.ties.get_mut(i)) else {
                    return;
                };
                match Cost(score).partial_cmp(&Cost(best.0)) {
                    Some(std::cmp::Ordering::Less) => {
                        *best = (score, pod);
                        *ties = 1;
                    }
                    Some(std::cmp::Ordering::Equal) => {
                        *ties = ties.saturating_add(1);
                        if rand::random_range(0..*ties) == 0 {
                            *best = (score, pod);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

fn min_max(values: &[f64]) -> Option<(f64, f64)> {
    let first = *values.first()?;
    Some(values.iter().fold((first, first), |(min, max), &v| (min.min(v), max.max(v))))
}

/// The index with the lowest value, ties at random.
fn lowest_index(values: impl Iterator<Item = (usize, f64)>) -> Option<usize> {
    let mut best = Lowest::new();
    for (i, value) in values {
        best.offer(Cost(value), i);
    }
    best.into_item()
}

impl Strategy for PdRouter {
    fn name(&self) -> &'static str {
        NAME
    }

    /// `pd` chooses pairs, not single pods: it has no per-pod score.
    fn score(
        &self,
        _request: &RouteRequest<'_>,
        _candidates: &[Arc<PodInfo>],
        _scores: &mut Vec<f64>,
    ) -> Result<(), Unscored> {
        Err(Unscored::NotScorable)
    }

    /// The pod that answers: the decode pod of the pair, or the combined
    /// pod. The proxy calls [`PdRouter::plan`] itself; this only serves
    /// callers that route a single pod.
    fn pick(&self, request: &RouteRequest<'_>, candidates: &[Arc<PodInfo>]) -> Result<usize, Unscored> {
        let answering = match self.plan(request, candidates).map_err(|_| Unscored::NotScorable)? {
            PdRoute::Pair(plan) => plan.decode,
            PdRoute::Combined(pod) => pod,
        };
        candidates.iter().position(|p| p.key == answering.key).ok_or(Unscored::NotScorable)
    }

    fn mixable(&self) -> bool {
        false
    }

    fn plan_pair(&self, request: &RouteRequest<'_>, candidates: &[Arc<PodInfo>]) -> Option<Result<PdRoute, PdRefusal>> {
        Some(self.plan(request, candidates))
    }
}

#[cfg(test)]
#[path = "pd_tests.rs"]
mod tests;
