//! AIBrix's own metric names (`gateway_*`, `aibrix_prefix_cache_*`,
//! `pd_selected_*`), exported beside Turnstile's so an AIBrix Grafana
//! dashboard and its alerts keep working (`--aibrix-metric-names`).
//!
//! Every series is bumped where Turnstile already counts its own, on label
//! sets built from what the request already holds (the model's `Arc<str>`,
//! the chosen pod as a shared [`PodIdentity`]): one more cached counter per event.
//! Label values stay bounded: models from discovery or `unknown`, pods from
//! discovery, fixed status and bucket names. AIBrix's
//! `gateway_first_token_delay_over_1s_total` carries a request id as a label
//! and is not exported.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwapOption;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// What the AIBrix series say of a pod; discovery's pods implement it
/// (metrics does not depend on discovery).
pub trait PodIdentity: std::fmt::Debug + Send + Sync {
    /// `namespace/name`, unique: what series are keyed by.
    fn key(&self) -> &str;
    fn name(&self) -> &str;
    fn namespace(&self) -> &str;
    fn model(&self) -> &str;
    fn engine(&self) -> &str;
    fn roleset(&self) -> Option<&str>;
    /// The pod's label `name`, empty when it has none.
    fn label(&self, name: &str) -> &str;
    /// Where the pod keeps its handles on its own series (`None`: it keeps
    /// none, and every event looks its series up).
    fn series(&self) -> Option<&SeriesHandles> {
        None
    }
}

/// Most series handles one pod keeps (models, outcomes and buckets past
/// this are looked up each time).
const MAX_HANDLES: usize = 32;

/// A pod's own handles on its AIBrix series (the request, outcome, token
/// and bucket counters of its answers), so recording an answer does not look
/// its labels up among every pod's series: with 1,000 pods each of the six
/// lookups an answer makes hashes the labels and walks a map of thousands of
/// entries no longer in the CPU's cache. Filled by the first answers recorded
/// on the pod; read without a lock; a clone starts empty.
#[derive(Debug, Default)]
pub struct SeriesHandles(ArcSwapOption<Handles>);

impl Clone for SeriesHandles {
    fn clone(&self) -> Self {
        Self::default()
    }
}

#[derive(Clone, Debug)]
struct Handles {
    /// Whose series these are, and since when.
    owner: Owner,
    counters: Vec<(Handle, Counter)>,
}

/// An [`AibrixMetrics`] registration (tests register many) and how many
/// times it has removed pods' series: handles taken before a removal are
/// not used after it, so a pod whose series were removed makes them anew.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Owner {
    id: u64,
    removals: u64,
}

/// Which of the pod's series a handle is.
#[derive(Clone, Debug, PartialEq)]
enum Handle {
    Request { model: Arc<str> },
    Outcome { model: Arc<str>, status: AibrixStatus, status_code: u16 },
    InputTokens,
    OutputTokens,
    PromptBucket(&'static str),
    CompletionBucket(&'static str),
}

impl SeriesHandles {
    /// Adds `by` to the series `handle` of `owner`'s, when held.
    fn bump(&self, owner: Owner, handle: &Handle, by: u64) -> bool {
        let handles = self.0.load();
        let Some(counter) = handles
            .as_ref()
            .filter(|held| held.owner == owner)
            .and_then(|held| held.counters.iter().find(|(h, _)| h == handle))
        else {
            return false;
        };
        counter.1.inc_by(by);
        true
    }

    /// Adds each `(handle, by)` to its series of `owner`'s when all are
    /// held, and nothing otherwise: what one answer adds at once, with one
    /// look at the handles. Each counter is read before any is added to, so
    /// their cache misses (one per counter with a large fleet) overlap
    /// instead of each waiting for the one before.
    fn bump_all<const N: usize>(&self, owner: Owner, bumps: [(&Handle, u64); N]) -> bool {
        let handles = self.0.load();
        let Some(held) = handles.as_ref().filter(|held| held.owner == owner) else {
            return false;
        };
        let mut found: [Option<(&Counter, u64)>; N] = [None; N];
        for (slot, (handle, by)) in found.iter_mut().zip(bumps) {
            let Some((_, counter)) = held.counters.iter().find(|(h, _)| h == handle) else {
                return false;
            };
            *slot = Some((counter, by));
        }
        let found = found.into_iter().flatten();
        std::hint::black_box(found.clone().fold(0u64, |sum, (counter, _)| sum.wrapping_add(counter.get())));
        for (counter, by) in found {
            counter.inc_by(by);
        }
        true
    }

    /// Holds `counter` as the series `handle` of `owner`'s. Two answers
    /// adding at once may keep only one: the other is looked up again.
    fn keep(&self, owner: Owner, handle: Handle, counter: &Counter) {
        let current = self.0.load_full();
        let mut next = match current.as_deref() {
            Some(held) if held.owner == owner && held.counters.len() >= MAX_HANDLES => return,
            Some(held) if held.owner == owner => held.clone(),
            _ => Handles { owner, counters: Vec::new() },
        };
        next.counters.push((handle, counter.clone()));
        self.0.store(Some(Arc::new(next)));
    }
}

/// AIBrix's PD role label (`role-name`), as discovery reads it.
const ROLE_LABEL: &str = "role-name";

/// AIBrix's StormService label holding a pod's replica index.
const ROLE_REPLICA_INDEX_LABEL: &str = "stormservice.orchestration.aibrix.ai/role-replica-index";

/// Turnstile keeps no KV event sync: the `using_kv_sync` label is always this.
const USING_KV_SYNC: &str = "false";

/// Upper bounds (exclusive) of AIBrix's token buckets and their names; a
/// count at or above the last bound is `32768+`.
const TOKEN_BUCKETS: [(u64, &str); 8] = [
    (256, "0-256"),
    (512, "256-512"),
    (1024, "512-1024"),
    (2048, "1024-2048"),
    (4096, "2048-4096"),
    (8192, "4096-8192"),
    (16384, "8192-16384"),
    (32768, "16384-32768"),
];

/// AIBrix's `bucket` label for a prompt or completion of `tokens` tokens.
/// A count on an edge goes to the bucket it starts (256 is `256-512`).
pub fn token_bucket(tokens: u64) -> &'static str {
    TOKEN_BUCKETS.iter().find(|(upper, _)| tokens < *upper).map_or("32768+", |(_, name)| name)
}

/// AIBrix's `match_percent_bucket` for a prompt of `prompt_blocks` prefix
/// blocks of which the chosen pod held `held_blocks`. Any hit is at least
/// `1-25` (the percentage is rounded up).
pub fn match_percent_bucket(held_blocks: usize, prompt_blocks: usize) -> &'static str {
    if held_blocks == 0 || prompt_blocks == 0 {
        return "0";
    }
    match (held_blocks.min(prompt_blocks) * 100).div_ceil(prompt_blocks) {
        0 => "0",
        1..=25 => "1-25",
        26..=50 => "26-50",
        51..=75 => "51-75",
        _ => "76-100",
    }
}

/// How a request ended, as AIBrix's `status` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AibrixStatus {
    /// The engine's answer reached its end with a 2xx status (`gateway_rsp_body_success`).
    Success,
    /// Refused before the body mattered: auth, path, method, rate limits,
    /// overload (`gateway_req_headers_fail`).
    RequestHeadersFail,
    /// The body or what it names was refused: bad JSON, unknown model, no
    /// ready pods, bad strategy (`gateway_req_body_fail`).
    RequestBodyFail,
    /// The engine could not be reached, did not answer in time, or answered
    /// with a non-2xx status (`gateway_rsp_headers_fail`).
    ResponseHeadersFail,
    /// The engine broke off mid-answer (`gateway_rsp_body_fail`).
    ResponseBodyFail,
    /// Refused while draining (`aibrix_gateway_server_shutdown`).
    ServerShutdown,
    /// The client went away before the answer ended (`client_cancelled_eof`).
    ClientCancelled,
    /// The client stopped reading and the gateway gave up (`context_cancelled`).
    ContextCancelled,
}

impl AibrixStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "gateway_rsp_body_success",
            Self::RequestHeadersFail => "gateway_req_headers_fail",
            Self::RequestBodyFail => "gateway_req_body_fail",
            Self::ResponseHeadersFail => "gateway_rsp_headers_fail",
            Self::ResponseBodyFail => "gateway_rsp_body_fail",
            Self::ServerShutdown => "aibrix_gateway_server_shutdown",
            Self::ClientCancelled => "client_cancelled_eof",
            Self::ContextCancelled => "context_cancelled",
        }
    }

    /// The `status_code` AIBrix reports with this status: its fixed code
    /// where it has one (499 for cancellations, 500 for a broken answer),
    /// else the status the client got.
    fn status_code(self, answered: u16) -> u16 {
        match self {
            Self::ClientCancelled | Self::ContextCancelled => 499,
            Self::ResponseBodyFail => 500,
            Self::ServerShutdown => 503,
            _ => answered,
        }
    }
}

/// A discovered pod as a label value: compared by the label values it
/// renders, so the hot path clones an `Arc` instead of building strings, and
/// two routing targets that render alike (a data-parallel pod's ranks) share
/// one series instead of rendering two identical ones.
///
/// Every request looks its pod's series up several times, so both halves of
/// a lookup stay cheap: the hash takes only the namespace and the name (pods
/// that render alike have the same ones; the role labels are map lookups),
/// and the same pod is equal to itself without comparing its values.
#[derive(Clone, Debug)]
struct Pod(Arc<dyn PodIdentity>);

impl Pod {
    fn values(&self) -> [&str; 7] {
        let pod = &self.0;
        [
            pod.namespace(),
            pod.name(),
            pod.model(),
            pod.engine(),
            pod.roleset().unwrap_or(""),
            pod.label(ROLE_LABEL),
            pod.label(ROLE_REPLICA_INDEX_LABEL),
        ]
    }
}

impl Hash for Pod {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // A part of what `eq` compares: equal pods hash alike.
        self.0.namespace().hash(state);
        self.0.name().hash(state);
    }
}

impl PartialEq for Pod {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.0), Arc::as_ptr(&other.0)) || self.values() == other.values()
    }
}

impl Eq for Pod {}

/// `pod_name`: the pod's name, or empty when no pod was chosen (as AIBrix).
/// Hashed and compared by that name, so two namespaces' pods of one name
/// share a series instead of rendering two with the same labels.
#[derive(Clone, Debug)]
struct PodName(Option<Pod>);

impl PodName {
    fn as_str(&self) -> &str {
        self.0.as_ref().map_or("", |pod| pod.0.name())
    }
}

impl Hash for PodName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialEq for PodName {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for PodName {}

impl EncodeLabelValue for PodName {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    gateway_pod: Arc<str>,
    model: Arc<str>,
    pod_name: PodName,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    gateway_pod: Arc<str>,
    model: Arc<str>,
    pod_name: PodName,
    status: &'static str,
    status_code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GatewayPodLabels {
    gateway_pod: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    gateway_pod: Arc<str>,
    model: Arc<str>,
}

/// AIBrix's labels of a series about one pod: namespace, pod, model,
/// engine_type, roleset, role, role_replica_index, gateway_pod.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct PodLabels {
    pod: Pod,
    gateway_pod: Arc<str>,
}

impl EncodeLabelSet for PodLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let [namespace, pod, model, engine, roleset, role, replica] = self.pod.values();
        [
            ("namespace", namespace),
            ("pod", pod),
            ("model", model),
            ("engine_type", engine),
            ("roleset", roleset),
            ("role", role),
            ("role_replica_index", replica),
            ("gateway_pod", &self.gateway_pod),
        ]
        .encode(encoder)
    }
}

/// The label sets of every per-pod series, by pod name, so the series of
/// pods that are gone can be removed (a rollout would otherwise add a
/// series per pod forever, each holding its pod).
#[derive(Debug, Default)]
struct PodSeries {
    requests: Vec<RequestLabels>,
    outcomes: Vec<OutcomeLabels>,
    pods: Vec<PodLabels>,
    buckets: Vec<(PodLabels, BucketLabel)>,
}

type SeriesIndex = Arc<Mutex<HashMap<String, PodSeries>>>;

/// The counter of `labels` in `family`; a series made now is noted in
/// `index` under pod `name` (in `list`), so it can be removed with its pod.
/// Existing series cost one lookup, as `get_or_create` does.
fn pod_counter<L>(
    family: &Family<L, Counter>,
    labels: &L,
    index: &SeriesIndex,
    name: Option<&str>,
    list: fn(&mut PodSeries) -> &mut Vec<L>,
) -> Counter
where
    L: EncodeLabelSet + Clone + Hash + Eq + Send + Sync + std::fmt::Debug + 'static,
{
    if let Some(counter) = family.get(labels) {
        return counter.clone();
    }
    if let Some(name) = name {
        let mut index = index.lock().unwrap_or_else(PoisonError::into_inner);
        list(index.entry(name.to_owned()).or_default()).push(labels.clone());
    }
    family.get_or_create(labels).clone()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BucketLabel {
    bucket: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PrefixDecisionLabels {
    model: Arc<str>,
    match_percent_bucket: &'static str,
    using_kv_sync: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PrefixSelectionLabels {
    model: Arc<str>,
    selection: &'static str,
    using_kv_sync: &'static str,
}

/// Registers a counter family under `name` (`_total` is appended).
fn counter<L>(registry: &mut Registry, name: &str, help: &str) -> Family<L, Counter>
where
    L: EncodeLabelSet + Clone + Hash + Eq + Send + Sync + std::fmt::Debug + 'static,
{
    let family = Family::default();
    registry.register(name, help, family.clone());
    family
}

/// AIBrix-named families, registered once at start. Clones share the families.
#[derive(Clone, Debug)]
pub struct AibrixMetrics {
    /// `gateway_pod`: env `POD_NAME` of this gateway, empty when unset.
    gateway_pod: Arc<str>,
    requests: Family<RequestLabels, Counter>,
    in_flight: Gauge,
    model_in_flight: Family<ModelLabels, Gauge>,
    successes: Family<OutcomeLabels, Counter>,
    failures: Family<OutcomeLabels, Counter>,
    input_tokens: Family<PodLabels, Counter>,
    output_tokens: Family<PodLabels, Counter>,
    prompt_buckets: Family<(PodLabels, BucketLabel), Counter>,
    completion_buckets: Family<(PodLabels, BucketLabel), Counter>,
    prefix_decisions: Family<PrefixDecisionLabels, Counter>,
    prefix_selections: Family<PrefixSelectionLabels, Counter>,
    prefill_selections: Family<PodLabels, Counter>,
    decode_selections: Family<PodLabels, Counter>,
    series: SeriesIndex,
    /// Tells this registration's series from another's in a pod's
    /// [`SeriesHandles`] (tests register many).
    id: u64,
    /// Times [`AibrixMetrics::retain_pods`] removed series (shared by clones).
    removals: Arc<AtomicU64>,
}

/// The next [`AibrixMetrics::id`].
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl AibrixMetrics {
    pub fn register(registry: &mut Registry, gateway_pod: &str) -> Self {
        let gateway_pod: Arc<str> = Arc::from(gateway_pod);
        let requests =
            counter(registry, "gateway_request", "AIBrix name: requests answered (proxied and gateway-made)");
        let successes = counter(
            registry,
            "gateway_request_model_success",
            "AIBrix name: answers the engine completed with a 2xx status",
        );
        let failures = counter(
            registry,
            "gateway_request_model_fail",
            "AIBrix name: requests that failed, by AIBrix status (phase) and status code",
        );
        let input_tokens =
            counter(registry, "gateway_input_tokens", "AIBrix name: prompt tokens of completed answers, per pod");
        let output_tokens =
            counter(registry, "gateway_output_tokens", "AIBrix name: completion tokens of completed answers, per pod");
        let prefix_decisions = counter(
            registry,
            "aibrix_prefix_cache_routing_decisions",
            "AIBrix name: prefix-cache decisions by the share of the prompt the chosen pod held",
        );
        let prefix_selections = counter(
            registry,
            "aibrix_prefix_cache_routing_selection",
            "AIBrix name: prefix-cache decisions: prefix_match or least_request_fallback",
        );
        let prefill_selections = counter(registry, "pd_selected_prefill_pod", "AIBrix name: prefill pods chosen by pd");
        let decode_selections = counter(registry, "pd_selected_decode_pod", "AIBrix name: decode pods chosen by pd");
        let prompt_buckets = counter(
            registry,
            "gateway_prompt_token_bucket",
            "AIBrix name: completed answers by prompt length, per pod",
        );
        let completion_buckets = counter(
            registry,
            "gateway_completion_token_bucket",
            "AIBrix name: completed answers by completion length, per pod",
        );
        let in_flight_family = Family::<GatewayPodLabels, Gauge>::default();
        registry.register(
            "gateway_in_flight_requests",
            "AIBrix name: requests routed to an engine whose answer has not ended",
            in_flight_family.clone(),
        );
        let in_flight =
            in_flight_family.get_or_create(&GatewayPodLabels { gateway_pod: Arc::clone(&gateway_pod) }).clone();
        let model_in_flight = Family::default();
        registry.register(
            "gateway_model_in_flight_requests",
            "AIBrix name: requests routed to an engine whose answer has not ended, per model",
            model_in_flight.clone(),
        );
        Self {
            gateway_pod,
            requests,
            in_flight,
            model_in_flight,
            successes,
            failures,
            input_tokens,
            output_tokens,
            prompt_buckets,
            completion_buckets,
            prefix_decisions,
            prefix_selections,
            prefill_selections,
            decode_selections,
            series: SeriesIndex::default(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            removals: Arc::default(),
        }
    }

    /// Removes the series of every pod whose name is not in `live` (pods
    /// that left discovery); a pod's series come back if it does.
    pub fn retain_pods(&self, live: &HashSet<&str>) {
        let gone: Vec<PodSeries> = {
            let mut index = self.series.lock().unwrap_or_else(PoisonError::into_inner);
            let names: Vec<String> = index.keys().filter(|name| !live.contains(name.as_str())).cloned().collect();
            names.iter().filter_map(|name| index.remove(name)).collect()
        };
        let removed = !gone.is_empty();
        for series in gone {
            for labels in &series.requests {
                self.requests.remove(labels);
            }
            for labels in &series.outcomes {
                self.successes.remove(labels);
                self.failures.remove(labels);
            }
            for labels in &series.pods {
                for family in
                    [&self.input_tokens, &self.output_tokens, &self.prefill_selections, &self.decode_selections]
                {
                    family.remove(labels);
                }
            }
            for labels in &series.buckets {
                self.prompt_buckets.remove(labels);
                self.completion_buckets.remove(labels);
            }
        }
        // Only once the series are gone: a handle taken meanwhile (on a
        // series about to go) is then one of before, and not used again; an
        // answer that sees the new count finds the series removed.
        if removed {
            self.removals.fetch_add(1, Ordering::Release);
        }
    }

    fn pod_name<P: PodIdentity + 'static>(pod: Option<&Arc<P>>) -> PodName {
        PodName(pod.map(|pod| Pod(Arc::clone(pod) as Arc<dyn PodIdentity>)))
    }

    fn pod_labels<P: PodIdentity + 'static>(&self, pod: &Arc<P>) -> PodLabels {
        PodLabels { pod: Pod(Arc::clone(pod) as Arc<dyn PodIdentity>), gateway_pod: Arc::clone(&self.gateway_pod) }
    }

    /// Adds `by` to the pod's series `handle` through the pod's own
    /// handles; else to `family`'s series of `labels` (made now if new),
    /// which the pod then holds.
    fn count<L, P>(
        &self,
        pod: Option<&Arc<P>>,
        handle: impl FnOnce() -> Handle,
        family: &Family<L, Counter>,
        labels: impl FnOnce() -> L,
        list: fn(&mut PodSeries) -> &mut Vec<L>,
        by: u64,
    ) where
        L: EncodeLabelSet + Clone + Hash + Eq + Send + Sync + std::fmt::Debug + 'static,
        P: PodIdentity + 'static,
    {
        let owner = Owner { id: self.id, removals: self.removals.load(Ordering::Acquire) };
        let held = pod.and_then(|pod| pod.series());
        let handle = held.map(|held| (held, handle()));
        if let Some((held, handle)) = &handle
            && held.bump(owner, handle, by)
        {
            return;
        }
        let counter = pod_counter(family, &labels(), &self.series, pod.map(|pod| pod.name()), list);
        counter.inc_by(by);
        if let Some((held, handle)) = handle {
            held.keep(owner, handle, &counter);
        }
    }

    /// A request was answered (`gateway_request_total`).
    pub fn request<P: PodIdentity + 'static>(&self, model: &Arc<str>, pod: Option<&Arc<P>>) {
        let labels = || RequestLabels {
            gateway_pod: Arc::clone(&self.gateway_pod),
            model: Arc::clone(model),
            pod_name: Self::pod_name(pod),
        };
        let handle = || Handle::Request { model: Arc::clone(model) };
        self.count(pod, handle, &self.requests, labels, |s| &mut s.requests, 1);
    }

    /// A request ended as `status` after the client got `answered`.
    pub fn outcome<P: PodIdentity + 'static>(
        &self,
        model: &Arc<str>,
        pod: Option<&Arc<P>>,
        status: AibrixStatus,
        answered: u16,
    ) {
        let status_code = status.status_code(answered);
        let labels = || OutcomeLabels {
            gateway_pod: Arc::clone(&self.gateway_pod),
            model: Arc::clone(model),
            pod_name: Self::pod_name(pod),
            status: status.as_str(),
            status_code,
        };
        let family = if status == AibrixStatus::Success { &self.successes } else { &self.failures };
        let handle = || Handle::Outcome { model: Arc::clone(model), status, status_code };
        self.count(pod, handle, family, labels, |s| &mut s.outcomes, 1);
    }

    /// The usage a completed answer reported.
    pub fn tokens<P: PodIdentity + 'static>(&self, pod: &Arc<P>, prompt_tokens: u64, completion_tokens: u64) {
        let (prompt, completion) = (token_bucket(prompt_tokens), token_bucket(completion_tokens));
        if let Some(held) = pod.series() {
            let owner = Owner { id: self.id, removals: self.removals.load(Ordering::Acquire) };
            let bumps = [
                (&Handle::InputTokens, prompt_tokens),
                (&Handle::OutputTokens, completion_tokens),
                (&Handle::PromptBucket(prompt), 1),
                (&Handle::CompletionBucket(completion), 1),
            ];
            if held.bump_all(owner, bumps) {
                return;
            }
        }
        let labels = || self.pod_labels(pod);
        let pods: fn(&mut PodSeries) -> &mut Vec<PodLabels> = |s| &mut s.pods;
        let buckets: fn(&mut PodSeries) -> &mut Vec<(PodLabels, BucketLabel)> = |s| &mut s.buckets;
        let some = Some(pod);
        self.count(some, || Handle::InputTokens, &self.input_tokens, labels, pods, prompt_tokens);
        self.count(some, || Handle::OutputTokens, &self.output_tokens, labels, pods, completion_tokens);
        let prompt_labels = || (labels(), BucketLabel { bucket: prompt });
        self.count(some, || Handle::PromptBucket(prompt), &self.prompt_buckets, prompt_labels, buckets, 1);
        let completion_labels = || (labels(), BucketLabel { bucket: completion });
        let handle = || Handle::CompletionBucket(completion);
        self.count(some, handle, &self.completion_buckets, completion_labels, buckets, 1);
    }

    /// Gauges for one request in flight on `model`, to increment now and
    /// decrement when it ends.
    pub fn in_flight(&self, model: &Arc<str>) -> [Gauge; 2] {
        let labels = ModelLabels { gateway_pod: Arc::clone(&self.gateway_pod), model: Arc::clone(model) };
        [self.in_flight.clone(), self.model_in_flight.get_or_create(&labels).clone()]
    }

    /// The prefix-cache strategy chose a pod holding `held_blocks` of the
    /// prompt's `prompt_blocks` prefix blocks.
    pub fn prefix_decision(&self, model: &Arc<str>, held_blocks: usize, prompt_blocks: usize) {
        let bucket = match_percent_bucket(held_blocks, prompt_blocks);
        let labels = PrefixDecisionLabels {
            model: Arc::clone(model),
            match_percent_bucket: bucket,
            using_kv_sync: USING_KV_SYNC,
        };
        self.prefix_decisions.get_or_create(&labels).inc();
        let selection = if held_blocks > 0 { "prefix_match" } else { "least_request_fallback" };
        let labels = PrefixSelectionLabels { model: Arc::clone(model), selection, using_kv_sync: USING_KV_SYNC };
        self.prefix_selections.get_or_create(&labels).inc();
    }

    /// The pd strategy chose `prefill` and `decode`.
    pub fn pd_selected<P: PodIdentity + 'static>(&self, prefill: &Arc<P>, decode: &Arc<P>) {
        let pods: fn(&mut PodSeries) -> &mut Vec<PodLabels> = |s| &mut s.pods;
        let series = &self.series;
        pod_counter(&self.prefill_selections, &self.pod_labels(prefill), series, Some(prefill.name()), pods).inc();
        pod_counter(&self.decode_selections, &self.pod_labels(decode), series, Some(decode.name()), pods).inc();
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::discovery::{PodInfo, Role};

    /// A discovered pod of `model` named `name`, in namespace `ns`.
    pub(in crate::metrics) fn pod(name: &str, model: &str, role: Option<&str>) -> Arc<PodInfo> {
        let mut labels = BTreeMap::new();
        if let Some(role) = role {
            labels.insert(crate::discovery::pod::ROLE_LABEL.to_owned(), role.to_owned());
            labels.insert(ROLE_REPLICA_INDEX_LABEL.to_owned(), "0".to_owned());
        }
        Arc::new(PodInfo {
            key: format!("ns/{name}"),
            name: name.to_owned(),
            namespace: "ns".to_owned(),
            model: model.to_owned(),
            addr: None,
            addr_text: String::new(),
            metric_port: 8000,
            engine: "vllm".to_owned(),
            roleset: role.map(|_| "rs1".to_owned()),
            role: Role::Combined,
            labels,
            config_annotation: None,
            pd: Default::default(),
            custom_paths: Vec::new(),
            data_parallel: 1,
            ready: true,
            load: Arc::default(),
            series: Default::default(),
        })
    }

    fn render(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, registry).expect("encode");
        out
    }

    fn assert_lines(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(text.lines().any(|l| l == *line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn a_pods_series_leave_with_it_and_its_ranks_share_one() {
        let mut registry = Registry::default();
        let metrics = AibrixMetrics::register(&mut registry, "gw-0");
        let model: Arc<str> = Arc::from("m");
        let (a, b) = (pod("a", "m", None), pod("b", "m", Some("decode")));
        // A data-parallel rank: its own key, rendered as its pod.
        let a_rank1 = Arc::new(PodInfo { key: "ns/a:8001".to_owned(), ..(*a).clone() });
        for pod in [&a, &a_rank1, &b] {
            metrics.request(&model, Some(pod));
            metrics.outcome(&model, Some(pod), AibrixStatus::Success, 200);
            metrics.tokens(pod, 300, 20);
        }
        metrics.pd_selected(&a, &b);
        let text = render(&registry);
        let a_lines = text.lines().filter(|l| l.contains(r#"pod="a""#) || l.contains(r#"pod_name="a""#)).count();
        assert_lines(&text, &[r#"gateway_request_total{gateway_pod="gw-0",model="m",pod_name="a"} 2"#]);
        assert_lines(
            &text,
            &[
                r#"gateway_input_tokens_total{namespace="ns",pod="a",model="m",engine_type="vllm",roleset="",role="",role_replica_index="",gateway_pod="gw-0"} 600"#,
            ],
        );

        metrics.retain_pods(&HashSet::from(["b"]));
        let text = render(&registry);
        assert!(!text.contains(r#"pod="a""#) && !text.contains(r#"pod_name="a""#), "a's series are gone:\n{text}");
        assert!(a_lines >= 7, "a had its series: {a_lines}");
        assert_lines(&text, &[r#"gateway_request_total{gateway_pod="gw-0",model="m",pod_name="b"} 1"#]);
        assert_eq!(Arc::strong_count(&a), 1, "nothing holds the gone pod");

        // A pod that comes back counts afresh.
        metrics.request(&model, Some(&a));
        assert_lines(&render(&registry), &[r#"gateway_request_total{gateway_pod="gw-0",model="m",pod_name="a"} 1"#]);
    }

    #[test]
    fn answers_counted_through_a_pods_handles_land_in_its_series() {
        let (mut first_registry, mut second_registry) = (Registry::default(), Registry::default());
        let first = AibrixMetrics::register(&mut first_registry, "gw-0");
        let second = AibrixMetrics::register(&mut second_registry, "gw-1");
        let (m, n): (Arc<str>, Arc<str>) = (Arc::from("m"), Arc::from("n"));
        let a = pod("a", "m", None);
        for _ in 0..3 {
            // Each request's model is its own string: handles match it by value.
            first.request(&Arc::from("m"), Some(&a));
            first.outcome(&m, Some(&a), AibrixStatus::Success, 200);
            first.tokens(&a, 300, 20);
        }
        first.request(&n, Some(&a));
        first.outcome(&m, Some(&a), AibrixStatus::ResponseBodyFail, 200);
        first.tokens(&a, 600, 20);
        let held = a.series.0.load().as_ref().map(|held| held.counters.len());
        assert_eq!(held, Some(9), "the pod holds a handle per series it counted into");
        second.request(&m, Some(&a));
        let a_labels =
            r#"namespace="ns",pod="a",model="m",engine_type="vllm",roleset="",role="",role_replica_index="""#;
        assert_lines(
            &render(&first_registry),
            &[
                r#"gateway_request_total{gateway_pod="gw-0",model="m",pod_name="a"} 3"#,
                r#"gateway_request_total{gateway_pod="gw-0",model="n",pod_name="a"} 1"#,
                r#"gateway_request_model_success_total{gateway_pod="gw-0",model="m",pod_name="a",status="gateway_rsp_body_success",status_code="200"} 3"#,
                r#"gateway_request_model_fail_total{gateway_pod="gw-0",model="m",pod_name="a",status="gateway_rsp_body_fail",status_code="500"} 1"#,
                &format!(r#"gateway_input_tokens_total{{{a_labels},gateway_pod="gw-0"}} 1500"#),
                &format!(r#"gateway_output_tokens_total{{{a_labels},gateway_pod="gw-0"}} 80"#),
                &format!(r#"gateway_prompt_token_bucket_total{{{a_labels},gateway_pod="gw-0",bucket="256-512"}} 3"#),
                &format!(r#"gateway_prompt_token_bucket_total{{{a_labels},gateway_pod="gw-0",bucket="512-1024"}} 1"#),
                &format!(r#"gateway_completion_token_bucket_total{{{a_labels},gateway_pod="gw-0",bucket="0-256"}} 4"#),
            ],
        );
        let text = render(&second_registry);
        assert_lines(&text, &[r#"gateway_request_total{gateway_pod="gw-1",model="m",pod_name="a"} 1"#]);

        // The pod's next discovery generation, relabelled, counts under its new labels.
        let mut relabelled = (*a).clone();
        relabelled.labels.insert(crate::discovery::pod::ROLE_LABEL.to_owned(), "prefill".to_owned());
        first.tokens(&Arc::new(relabelled), 300, 20);
        let prefill =
            r#"namespace="ns",pod="a",model="m",engine_type="vllm",roleset="",role="prefill",role_replica_index="""#;
        assert_lines(
            &render(&first_registry),
            &[
                &format!(r#"gateway_input_tokens_total{{{prefill},gateway_pod="gw-0"}} 300"#),
                &format!(r#"gateway_input_tokens_total{{{a_labels},gateway_pod="gw-0"}} 1500"#),
            ],
        );
    }

    #[test]
    fn a_pod_past_its_handles_still_counts_every_series() {
        let mut registry = Registry::default();
        let metrics = AibrixMetrics::register(&mut registry, "gw-0");
        let a = pod("a", "m", None);
        let models: Vec<Arc<str>> = (0..MAX_HANDLES + 8).map(|i| Arc::from(format!("m{i}"))).collect();
        for _ in 0..2 {
            for model in &models {
                metrics.request(model, Some(&a));
            }
        }
        let held = a.series.0.load().as_ref().map(|held| held.counters.len());
        assert_eq!(held, Some(MAX_HANDLES), "the pod holds no more than its cap");
        let text = render(&registry);
        for model in &models {
            assert_lines(
                &text,
                &[&format!(r#"gateway_request_total{{gateway_pod="gw-0",model="{model}",pod_name="a"}} 2"#)],
            );
        }
    }

    #[test]
    fn token_buckets_have_aibrix_names_and_edges() {
        let cases = [
            (0, "0-256"),
            (255, "0-256"),
            (256, "256-512"),
            (511, "256-512"),
            (512, "512-1024"),
            (1024, "1024-2048"),
            (2048, "2048-4096"),
            (4096, "4096-8192"),
            (8192, "8192-16384"),
            (16383, "8192-16384"),
            (16384, "16384-32768"),
            (32767, "16384-32768"),
            (32768, "32768+"),
            (u64::MAX, "32768+"),
        ];
        for (tokens, bucket) in cases {
            assert_eq!(token_bucket(tokens), bucket, "{tokens} tokens");
        }
    }

    #[test]
    fn match_percent_buckets_have_aibrix_names_and_edges() {
        let cases = [
            ((0, 0), "0"),
            ((0, 10), "0"),
            ((1, 200), "1-25"),
            ((1, 4), "1-25"),
            ((26, 100), "26-50"),
            ((1, 2), "26-50"),
            ((51, 100), "51-75"),
            ((3, 4), "51-75"),
            ((76, 100), "76-100"),
            ((4, 4), "76-100"),
            ((9, 4), "76-100"),
        ];
        for ((held, blocks), bucket) in cases {
            assert_eq!(match_percent_bucket(held, blocks), bucket, "{held} of {blocks} blocks");
        }
    }

    #[test]
    fn request_series_carry_aibrix_labels() {
        let mut registry = Registry::default();
        let metrics = AibrixMetrics::register(&mut registry, "gw-0");
        let model: Arc<str> = Arc::from("m");
        let a = pod("a", "m", None);
        metrics.request(&model, Some(&a));
        metrics.request(&Arc::from("unknown"), None::<&Arc<PodInfo>>);
        metrics.outcome(&model, Some(&a), AibrixStatus::Success, 200);
        metrics.outcome(&model, Some(&a), AibrixStatus::ResponseHeadersFail, 500);
        metrics.outcome(&model, Some(&a), AibrixStatus::ClientCancelled, 200);
        metrics.outcome(&model, Some(&a), AibrixStatus::ResponseBodyFail, 200);
        metrics.outcome(&Arc::from("unknown"), None::<&Arc<PodInfo>>, AibrixStatus::RequestBodyFail, 404);
        metrics.outcome(&model, None::<&Arc<PodInfo>>, AibrixStatus::ServerShutdown, 503);
        let mut same_name = (*pod("a", "m", None)).clone();
        same_name.key = "other/a".to_owned();
        metrics.request(&model, Some(&Arc::new(same_name)));
        let gauges = metrics.in_flight(&model);
        for gauge in &gauges {
            gauge.inc();
        }
        let text = render(&registry);
        assert_lines(
            &text,
            &[
                r#"gateway_request_total{gateway_pod="gw-0",model="m",pod_name="a"} 2"#,
                r#"gateway_request_total{gateway_pod="gw-0",model="unknown",pod_name=""} 1"#,
                r#"gateway_request_model_success_total{gateway_pod="gw-0",model="m",pod_name="a",status="gateway_rsp_body_success",status_code="200"} 1"#,
                r#"gateway_request_model_fail_total{gateway_pod="gw-0",model="m",pod_name="a",status="gateway_rsp_headers_fail",status_code="500"} 1"#,
                r#"gateway_request_model_fail_total{gateway_pod="gw-0",model="m",pod_name="a",status="client_cancelled_eof",status_code="499"} 1"#,
                r#"gateway_request_model_fail_total{gateway_pod="gw-0",model="m",pod_name="a",status="gateway_rsp_body_fail",status_code="500"} 1"#,
                r#"gateway_request_model_fail_total{gateway_pod="gw-0",model="unknown",pod_name="",status="gateway_req_body_fail",status_code="404"} 1"#,
                r#"gateway_request_model_fail_total{gateway_pod="gw-0",model="m",pod_name="",status="aibrix_gateway_server_shutdown",status_code="503"} 1"#,
                r#"gateway_in_flight_requests{gateway_pod="gw-0"} 1"#,
                r#"gateway_model_in_flight_requests{gateway_pod="gw-0",model="m"} 1"#,
            ],
        );
    }

    #[test]
    fn pod_series_carry_aibrix_pod_labels() {
        let mut registry = Registry::default();
        let metrics = AibrixMetrics::register(&mut registry, "");
        let a = pod("a", "m", None);
        metrics.tokens(&a, 300, 10);
        metrics.tokens(&a, 40_000, 10);
        let (prefill, decode) = (pod("p", "m", Some("prefill")), pod("d", "m", Some("decode")));
        metrics.pd_selected(&prefill, &decode);
        let text = render(&registry);
        let a_labels = r#"namespace="ns",pod="a",model="m",engine_type="vllm",roleset="",role="",role_replica_index="",gateway_pod="""#;
        let pd = |name: &str, role: &str| {
            format!(
                r#"namespace="ns",pod="{name}",model="m",engine_type="vllm",roleset="rs1",role="{role}",role_replica_index="0",gateway_pod="""#
            )
        };
        assert_lines(
            &text,
            &[
                &format!("gateway_input_tokens_total{{{a_labels}}} 40300"),
                &format!("gateway_output_tokens_total{{{a_labels}}} 20"),
                &format!(r#"gateway_prompt_token_bucket_total{{{a_labels},bucket="256-512"}} 1"#),
                &format!(r#"gateway_prompt_token_bucket_total{{{a_labels},bucket="32768+"}} 1"#),
                &format!(r#"gateway_completion_token_bucket_total{{{a_labels},bucket="0-256"}} 2"#),
                &format!("pd_selected_prefill_pod_total{{{}}} 1", pd("p", "prefill")),
                &format!("pd_selected_decode_pod_total{{{}}} 1", pd("d", "decode")),
            ],
        );
    }

    #[test]
    fn prefix_decisions_carry_bucket_selection_and_no_kv_sync() {
        let mut registry = Registry::default();
        let metrics = AibrixMetrics::register(&mut registry, "gw-0");
        let model: Arc<str> = Arc::from("m");
        metrics.prefix_decision(&model, 0, 8);
        metrics.prefix_decision(&model, 8, 8);
        metrics.prefix_decision(&model, 2, 8);
        let text = render(&registry);
        assert_lines(
            &text,
            &[
                r#"aibrix_prefix_cache_routing_decisions_total{model="m",match_percent_bucket="0",using_kv_sync="false"} 1"#,
                r#"aibrix_prefix_cache_routing_decisions_total{model="m",match_percent_bucket="76-100",using_kv_sync="false"} 1"#,
                r#"aibrix_prefix_cache_routing_decisions_total{model="m",match_percent_bucket="1-25",using_kv_sync="false"} 1"#,
                r#"aibrix_prefix_cache_routing_selection_total{model="m",selection="prefix_match",using_kv_sync="false"} 2"#,
                r#"aibrix_prefix_cache_routing_selection_total{model="m",selection="least_request_fallback",using_kv_sync="false"} 1"#,
            ],
        );
    }
}
