//! `slo`, `slo-pack-load`, `slo-least-load`, `slo-least-load-pulling`:
//! routing by what each deployment can sustain, from the GPU profiles
//! AIBrix's GPU optimizer writes to Redis ([`super::gpu_profile`]).
//!
//! As AIBrix (`slo.go`, `slo_queue.go`, `least_load.go`, `pack_load.go`,
//! `pending_load_provider.go`):
//!
//! - A request's *features* are its prompt tokens (cl100k) and its
//!   predicted output tokens: a draw from the output lengths this gateway
//!   saw for prompts of the same size (log2 buckets) over the last 240 s,
//!   or 1 while it has seen none.
//! - A pod's deployment is its label `app.kubernetes.io/name` (or the label
//!   `AIBRIX_POD_DEPLOYMENT_LABEL` names), unless it carries the
//!   RayClusterFleet label `orchestration.aibrix.ai/raycluster-fleet-name`.
//! - Without a profile for any candidate's deployment (or when a profile
//!   cannot rank the request: no SLO, a table too small), the request is
//!   routed by least-request, as AIBrix's fallback router does (counted in
//!   `aibrix_gateway_routing_fallbacks_total{reason="no_slo_profile"}`).
//! - Otherwise each profiled deployment ranks the request: seconds waited
//!   plus the profile's expected latency minus the SLO target (E2E, TTFT,
//!   TPAT or TPOT, the first set of tpot, ttft, tpat, e2e). The most relaxed
//!   deployment is tried first, the others only while they do not expect
//!   a violation (rank ≤ 0). Only that deployment's pods are candidates.
//! - A request *consumes* `1 / (throughput × mean latency)` of a pod at its
//!   cell (Little's law: the inverse of the requests the pod holds at once);
//!   a pod's *utilization* is the sum over the requests this gateway routed
//!   to it by an slo strategy and that have not ended. The *capacity* is 1.
//!   - `slo`, `slo-least-load-pulling`: the pod with the lowest
//!     utilization + consumption that stays within capacity.
//!   - `slo-pack-load`: the pod with the highest utilization + consumption
//!     that stays within capacity (fills pods before using others).
//!   - `slo-least-load`: the pod with the lowest utilization; no capacity.
//!   - A cell whose throughput is 0 refuses the request (`slo failure
//!     request`).
//! - When every pod is at capacity the request waits for one of the
//!   model's slo requests to end. AIBrix waits until the client goes; here
//!   the wait is bounded: at most [`QUEUE_WAIT`] from the first try, and at
//!   most [`QUEUE_LENGTH`] requests of a model wait at once. Past either the
//!   request is refused. Refusals answer 503 `error on selecting target pod`
//!   with `x-error-routing: true`, as AIBrix does. While waiting no lock is
//!   held: the proxy awaits the wake-up, then routes again. Unlike AIBrix's
//!   queue, waiting requests are not ordered by rank: all are woken when
//!   room is made and the first to route takes it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::gpu_profile::{GpuProfile, ProfileError, Profiles};
use super::ties::Lowest;
use super::{RouteDecision, RouteRequest, Strategy, TokenUsage, Unroutable, Unscored, UsageCallback};
use crate::discovery::PodInfo;

/// Longest a request waits for a pod with room, from its first try.
pub const QUEUE_WAIT: Duration = Duration::from_secs(30);
/// Requests of one model waiting at once at most; more are refused.
pub const QUEUE_LENGTH: usize = 1024;
/// A waiting request looks again this often even unwoken (pods come and
/// go, profiles change).
const RECHECK_EVERY: Duration = Duration::from_millis(500);
/// A pod's capacity in pending load.
const CAPACITY: f64 = 1.0;
/// Models whose output lengths and queues are kept at most.
const MAX_MODELS: usize = 1024;

/// Which pod an slo strategy picks within a deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Least utilization + consumption within capacity.
    LeastLoadPulling,
    /// Most utilization + consumption within capacity.
    PackLoad,
    /// Least utilization, no capacity.
    LeastLoad,
}

/// Why an slo strategy refused a request (AIBrix's error texts).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SloRefusal {
    #[error("load capacity reached")]
    LoadCapacityReached,
    #[error("slo failure request")]
    SloFailureRequest,
    #[error("no pod available")]
    NoPodAvailable,
    #[error("{0}")]
    Profile(#[from] ProfileError),
}

/// What the slo strategies share: profiles, pods' pending load, output
/// lengths seen and the waiting requests, per model.
#[derive(Debug, Default)]
pub struct SloState {
    pub profiles: Arc<Profiles>,
    /// Pending load per pod key.
    loads: Mutex<HashMap<String, f64>>,
    models: Mutex<HashMap<Arc<str>, Arc<ModelState>>>,
}

#[derive(Debug)]
struct ModelState {
    outputs: OutputLengths,
    queue: Arc<Queue>,
}

impl SloState {
    fn model(&self, model: &Arc<str>) -> Arc<ModelState> {
        let mut models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(state) = models.get(model) {
            return Arc::clone(state);
        }
        let state = Arc::new(ModelState { outputs: OutputLengths::new(), queue: Arc::default() });
        if models.len() < MAX_MODELS {
            models.insert(Arc::clone(model), Arc::clone(&state));
        }
        state
    }

    fn loads(&self) -> std::sync::MutexGuard<'_, HashMap<String, f64>> {
        self.loads.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A request's features, worked out on its first try and kept for retries.
#[derive(Debug)]
pub struct Features {
    first_try: Instant,
    prompt_tokens: u64,
    output_tokens: u64,
}

impl Features {
    /// (output tokens, prompt tokens), as profiles index them.
    fn values(&self) -> [f64; 2] {
        [self.output_tokens as f64, self.prompt_tokens as f64]
    }
}

/// One of the four slo strategies.
pub struct Slo {
    name: &'static str,
    mode: Mode,
    state: Arc<SloState>,
}

/// The four strategies, sharing `state`.
pub fn family(state: &Arc<SloState>) -> Vec<Arc<dyn Strategy>> {
    [
        ("slo", Mode::LeastLoadPulling),
        ("slo-pack-load", Mode::PackLoad),
        ("slo-least-load", Mode::LeastLoad),
        ("slo-least-load-pulling", Mode::LeastLoadPulling),
    ]
    .into_iter()
    .map(|(name, mode)| Arc::new(Slo { name, mode, state: Arc::clone(state) }) as Arc<dyn Strategy>)
    .collect()
}

/// The deployment a pod belongs to, as AIBrix derives it from its labels.
pub fn deployment_of(pod: &PodInfo) -> Option<&str> {
    static LABELS: OnceLock<(String, String)> = OnceLock::new();
    let (fleet, deployment) = LABELS.get_or_init(|| {
        let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
        (
            env("AIBRIX_POD_RAYCLUSTERFLEET_LABEL", "orchestration.aibrix.ai/raycluster-fleet-name"),
            env("AIBRIX_POD_DEPLOYMENT_LABEL", "app.kubernetes.io/name"),
        )
    });
    if let Some(name) = pod.labels.get(fleet) {
        return Some(name);
    }
    let ray_node = pod.labels.get("ray.io/is-ray-node").is_some_and(|v| v == "yes");
    pod.labels.get(deployment).filter(|_| !ray_node).map(String::as_str)
}

/// One deployment's candidates, with their indexes.
type ByDeployment<'a> = Vec<(usize, &'a Arc<PodInfo>)>;

/// A profiled deployment and how it ranks a request.
struct Ranked<'a> {
    deployment: &'a str,
    profile: Arc<GpuProfile>,
    rank: f64,
}

/// Seconds the request is expected to overshoot its SLO on `profile`
/// (negative: within it).
fn rank(profile: &GpuProfile, features: &Features, now: Instant) -> Result<f64, ProfileError> {
    let cell = profile.signature(features.values())?;
    let slos = &profile.slos;
    let (expected, target) = if slos.tpot > 0.0 {
        (profile.e2e_seconds(cell)?, slos.tpot * features.output_tokens as f64 + slos.ttft)
    } else if slos.ttft > 0.0 {
        (profile.ttft_seconds(cell)?, slos.ttft)
    } else if slos.tpat > 0.0 {
        (profile.e2e_seconds(cell)?, slos.tpat * (features.prompt_tokens + features.output_tokens) as f64)
    } else if slos.e2e > 0.0 {
        (profile.e2e_seconds(cell)?, slos.e2e)
    } else {
        return Err(ProfileError::NoSlo);
    };
    Ok(now.duration_since(features.first_try).as_secs_f64() + expected - target)
}

/// The share of a pod the request takes on `profile`: `1 / (throughput ×
/// latency)`. As AIBrix, a missing latency counts as no consumption.
fn consumption(profile: &GpuProfile, features: &Features) -> Result<f64, SloRefusal> {
    let cell = profile.signature(features.values())?;
    let throughput = profile.throughput(cell)?;
    let Ok(latency) = profile.e2e_seconds(cell) else { return Ok(0.0) };
    if throughput == 0.0 {
        return Err(SloRefusal::SloFailureRequest);
    }
    Ok(1.0 / throughput / latency)
}

impl Slo {
    fn features(&self, request: &RouteRequest<'_>, model: &ModelState) -> Arc<Features> {
        Arc::clone(request.slo_features.get_or_init(|| {
            let prompt_tokens = u64::try_from(crate::tokens::count_tokens(request.prompt())).unwrap_or(0);
            let output_tokens = model.outputs.predict(prompt_tokens);
            Arc::new(Features { first_try: Instant::now(), prompt_tokens, output_tokens })
        }))
    }

    /// Chooses among the pods of one deployment: the pod and the load the
    /// request adds to it, or why none. `loads` is held from this choice
    /// until the load is added, so requests routed at once cannot all see
    /// the same room.
    fn within(
        &self,
        loads: &HashMap<String, f64>,
        pods: &[(usize, &Arc<PodInfo>)],
        profile: &GpuProfile,
        features: &Features,
    ) -> Result<(usize, f64), SloRefusal> {
        let mut last = SloRefusal::NoPodAvailable;
        let mut note = |err: SloRefusal| {
            if last != SloRefusal::LoadCapacityReached {
                last = err;
            }
        };
        let mut best = Lowest::new();
        for &(index, pod) in pods {
            let load = loads.get(&pod.key).copied().unwrap_or(0.0);
            let consumption = match consumption(profile, features) {
                Ok(c) => c,
                // Push mode only counts the load: the request is routed anyway.
                Err(_) if self.mode == Mode::LeastLoad => 0.0,
                Err(err) => {
                    note(err);
                    continue;
                }
            };
            let key = match self.mode {
                Mode::LeastLoad => load,
                Mode::LeastLoadPulling | Mode::PackLoad if load + consumption > CAPACITY => {
                    note(SloRefusal::LoadCapacityReached);
                    continue;
                }
                Mode::LeastLoadPulling => load + consumption,
                Mode::PackLoad if load + consumption <= 0.0 => continue,
                Mode::PackLoad => -(load + consumption),
            };
            best.offer((key, pod.load.routing_load()), (index, consumption));
        }
        best.into_item().ok_or(last)
    }

    /// Adds the request's load to its pod (in `loads`, still held since the
    /// choice) and takes it off again when the request ends.
    fn decision(
        &self,
        loads: &mut HashMap<String, f64>,
        (index, pod): (usize, &PodInfo),
        added: f64,
        model: &Arc<ModelState>,
        features: &Features,
    ) -> RouteDecision {
        if added != 0.0 {
            *loads.entry(pod.key.clone()).or_insert(0.0) += added;
        }
        let pending = Pending { state: Arc::clone(&self.state), model: Arc::clone(model), pod: pod.key.clone(), added };
        let prompt_tokens = features.prompt_tokens;
        let on_usage = UsageCallback::new(move |usage: Option<TokenUsage>| {
            if let Some(usage) = usage {
                let prompt = if usage.prompt_tokens > 0 { usage.prompt_tokens } else { prompt_tokens };
                pending.model.outputs.record(prompt, usage.completion_tokens);
            }
            drop(pending);
        });
        RouteDecision { index, headers: Vec::new(), on_usage: Some(on_usage) }
    }
}

impl Strategy for Slo {
    fn name(&self) -> &'static str {
        self.name
    }

    /// Reached only when no candidate has a usable profile: the router then
    /// routes by least-request, as AIBrix's fallback does.
    fn score(&self, _: &RouteRequest<'_>, _: &[Arc<PodInfo>], _: &mut Vec<f64>) -> Result<(), Unscored> {
        Err(Unscored::NoSloProfile)
    }

    fn mixable(&self) -> bool {
        false
    }

    fn admit(&self, request: &RouteRequest<'_>, candidates: &[Arc<PodInfo>]) -> Option<Result<RouteDecision, Unroutable>> {
        // Candidates by deployment, in order of first appearance.
        let mut deployments: Vec<(&str, ByDeployment<'_>)> = Vec::new();
        for (index, pod) in candidates.iter().enumerate() {
            let name = deployment_of(pod).unwrap_or("");
            match deployments.iter_mut().find(|(d, _)| *d == name) {
                Some((_, pods)) => pods.push((index, pod)),
                None => deployments.push((name, vec![(index, pod)])),
            }
        }
        let profiled: Vec<(&str, Arc<GpuProfile>)> = deployments
            .iter()
            .filter_map(|(name, _)| Some((*name, self.state.profiles.get(request.model, name)?)))
            .collect();
        if profiled.is_empty() {
            return None;
        }
        let model = self.state.model(request.model);
        let features = self.features(request, &model);
        let now = Instant::now();
        let mut ranked = Vec::with_capacity(profiled.len());
        for (deployment, profile) in profiled {
            // A profile that cannot rank the request sends it to the fallback.
            let rank = rank(&profile, &features, now).ok()?;
            ranked.push(Ranked { deployment, profile, rank });
        }
        ranked.sort_by(|a, b| a.rank.total_cmp(&b.rank));
        let mut last = SloRefusal::NoPodAvailable;
        let mut loads = self.state.loads();
        for (i, ranked) in ranked.iter().enumerate() {
            if i > 0 && ranked.rank > 0.0 {
                break;
            }
            let pods = deployments.iter().find(|(d, _)| *d == ranked.deployment).map_or(&[][..], |(_, p)| p);
            match self.within(&loads, pods, &ranked.profile, &features) {
                Ok((index, added)) => {
                    let pod = (index, &*candidates[index]);
                    return Some(Ok(self.decision(&mut loads, pod, added, &model, &features)));
                }
                Err(err) => last = err,
            }
        }
        if last != SloRefusal::LoadCapacityReached {
            return Some(Err(Unroutable::Slo(last)));
        }
        // Entered with `loads` still held: a request that ends takes its
        // load off under the same lock before it wakes the queue, so that
        // wake-up is not missed.
        let deadline = features.first_try + QUEUE_WAIT;
        Some(match model.queue.enter(deadline) {
            Some(wait) => Err(Unroutable::Queued(wait)),
            None => Err(Unroutable::Slo(SloRefusal::LoadCapacityReached)),
        })
    }
}

/// The load a routed request adds to its pod, taken off when the request
/// ends (its usage callback runs or is dropped); the model's waiting
/// requests are then woken.
struct Pending {
    state: Arc<SloState>,
    model: Arc<ModelState>,
    pod: String,
    added: f64,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.added != 0.0 {
            let mut loads = self.state.loads();
            if let Some(load) = loads.get_mut(&self.pod) {
                *load -= self.added;
                if *load <= 1e-9 {
                    loads.remove(&self.pod);
                }
            }
        }
        self.model.queue.wake();
    }
}

/// A model's waiting requests: how many, and how they are woken.
#[derive(Debug, Default)]
pub struct Queue {
    waiting: AtomicUsize,
    /// Bumped whenever room may have been made.
    room: AtomicU64,
    notify: Notify,
}

impl Queue {
    /// A place in the queue until `deadline`, `None` when the queue is full
    /// or the deadline has passed.
    fn enter(self: &Arc<Self>, deadline: Instant) -> Option<SloWait> {
        if Instant::now() >= deadline {
            return None;
        }
        let entered = self.waiting.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < QUEUE_LENGTH).then_some(n + 1));
        entered.ok()?;
        Some(SloWait { queue: Arc::clone(self), seen: self.room.load(Ordering::Acquire), deadline })
    }

    fn wake(&self) {
        self.room.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_waiters();
    }
}

/// A request waiting for a pod with room (see the module docs for bounds).
#[derive(Debug)]
pub struct SloWait {
    queue: Arc<Queue>,
    /// The room count when the request found no room.
    seen: u64,
    deadline: Instant,
}

impl PartialEq for SloWait {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.queue, &other.queue) && self.seen == other.seen && self.deadline == other.deadline
    }
}

impl Eq for SloWait {}

impl SloWait {
    /// Returns when room may have been made, a recheck is due or the
    /// deadline is reached; the caller then routes again (which refuses the
    /// request past its deadline).
    pub async fn wait(self) {
        let notified = self.queue.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.queue.room.load(Ordering::Acquire) != self.seen {
            return;
        }
        let until = self.deadline.min(Instant::now() + RECHECK_EVERY);
        let _ = tokio::time::timeout_at(until.into(), notified).await;
    }
}

impl Drop for SloWait {
    fn drop(&mut self) {
        self.queue.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Output lengths seen per prompt size over the last [`WINDOW_SLOTS`] ×
/// [`SLOT`], both on a log2 scale (AIBrix's `SimpleOutputPredictor`).
#[derive(Debug)]
struct OutputLengths {
    started: Instant,
    slots: Mutex<Vec<(u64, Vec<u32>)>>,
}

const SLOT: Duration = Duration::from_secs(10);
const WINDOW_SLOTS: usize = 24;
/// Log2 buckets of 1..=1M tokens.
const BUCKETS: usize = 21;

fn bucket(tokens: u64) -> usize {
    if tokens == 0 { 0 } else { ((tokens as f64).log2().round() as usize).min(BUCKETS - 1) }
}

impl OutputLengths {
    fn new() -> Self {
        Self { started: Instant::now(), slots: Mutex::new(vec![(u64::MAX, vec![0; BUCKETS * BUCKETS]); WINDOW_SLOTS]) }
    }

    fn epoch(&self) -> u64 {
        self.started.elapsed().as_secs() / SLOT.as_secs()
    }

    fn record(&self, prompt_tokens: u64, output_tokens: u64) {
        let epoch = self.epoch();
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = &mut slots[(epoch % WINDOW_SLOTS as u64) as usize];
        if slot.0 != epoch {
            *slot = (epoch, vec![0; BUCKETS * BUCKETS]);
        }
        let cell = &mut slot.1[bucket(prompt_tokens) * BUCKETS + bucket(output_tokens)];
        *cell = cell.saturating_add(1);
    }

    /// A draw from the output lengths seen for prompts of this size, 1 when
    /// none were seen.
    fn predict(&self, prompt_tokens: u64) -> u64 {
        let epoch = self.epoch();
        let row = bucket(prompt_tokens) * BUCKETS;
        let mut counts = [0u64; BUCKETS];
        {
            let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            for (at, cells) in slots.iter() {
                if *at <= epoch && epoch - at < WINDOW_SLOTS as u64 {
                    for (count, cell) in counts.iter_mut().zip(&cells[row..row + BUCKETS]) {
                        *count += u64::from(*cell);
                    }
                }
            }
        }
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 1;
        }
        let mut cursor = rand::random_range(0..total);
        for (bucket, count) in counts.iter().enumerate() {
            if cursor < *count {
                return 1 << bucket;
            }
            cursor -= count;
        }
        1 << (BUCKETS - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::{Route, Router};
    use super::*;
    use crate::discovery::PodInfo;

    /// Pod `p<i>` of deployment `deployment` with `in_flight` requests.
    fn pod_of(i: u16, deployment: &str) -> Arc<PodInfo> {
        let (pod, _) = pod(i, 0);
        let mut pod = Arc::into_inner(pod).expect("sole owner");
        pod.labels.insert("app.kubernetes.io/name".into(), deployment.into());
        Arc::new(pod)
    }

    /// A profile on `deployment` where any request takes `1 / (tput × e2e)`
    /// of a pod, within SLO `e2e_slo`.
    fn profile(deployment: &str, tput: f64, e2e: f64, e2e_slo: f64) -> String {
        format!(
            r#"{{"gpu":"{deployment}","created":1,"indexes":[[1],[1]],"tputs":[[{tput}]],"e2e":[[{e2e}]],"slos":{{"e2e":{e2e_slo}}}}}"#
        )
    }

    fn with_profiles(profiles: &[(&str, String)]) -> Router {
        let router = router();
        for (deployment, json) in profiles {
            router.slo_state().profiles.insert("m", deployment, json);
        }
        router
    }

    fn route(router: &Router, strategy: &str, pods: &[Arc<PodInfo>]) -> Result<Route, Unroutable> {
        let model = model();
        let request = RouteRequest::new(&model, b"hello");
        let strategy = router.strategy(strategy).expect("registered");
        router.route(strategy.as_ref(), &request, pods)
    }

    /// The pod chosen, keeping the request in flight (its usage callback).
    fn chosen(route: Result<Route, Unroutable>) -> (String, UsageCallback) {
        match route {
            Ok(Route::Single { pod, decision }) => (pod.name.clone(), decision.on_usage.expect("tracked")),
            other => panic!("not routed to one pod: {other:?}"),
        }
    }

    #[test]
    fn pulling_spreads_within_capacity_then_makes_requests_wait() {
        // Each request takes half a pod: two pods hold four requests.
        let router = with_profiles(&[("d", profile("d", 2.0, 1.0, 10.0))]);
        let pods = [pod_of(0, "d"), pod_of(1, "d")];
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(chosen(route(&router, "slo", &pods)));
        }
        let on_p0 = held.iter().filter(|(name, _)| name == "p0").count();
        assert_eq!(on_p0, 2, "least load first: two each");
        assert!(matches!(route(&router, "slo-least-load-pulling", &pods), Err(Unroutable::Queued(_))));
        // One ends: its pod has room again.
        let (freed, done) = held.pop().expect("held");
        done.call(None);
        assert_eq!(chosen(route(&router, "slo", &pods)).0, freed);
    }

    #[test]
    fn requests_routed_at_once_do_not_share_the_last_room() {
        // Two pods hold four requests; eight threads route at once, many
        // times over. Never more than four may be admitted.
        let router = with_profiles(&[("d", profile("d", 2.0, 1.0, 10.0))]);
        let pods = [pod_of(0, "d"), pod_of(1, "d")];
        for round in 0..300 {
            let start = std::sync::Barrier::new(8);
            let routed: Vec<_> = std::thread::scope(|scope| {
                let threads: Vec<_> = (0..8)
                    .map(|_| {
                        scope.spawn(|| {
                            start.wait();
                            match route(&router, "slo", &pods) {
                                Ok(Route::Single { decision, .. }) => Some(decision.on_usage.expect("tracked")),
                                Err(Unroutable::Queued(_)) => None,
                                other => panic!("neither routed nor queued: {other:?}"),
                            }
                        })
                    })
                    .collect();
                threads.into_iter().filter_map(|thread| thread.join().expect("router thread")).collect()
            });
            assert_eq!(routed.len(), 4, "round {round}: four fit, the others wait");
        }
    }

    #[test]
    fn pack_load_fills_one_pod_before_the_next() {
        let router = with_profiles(&[("d", profile("d", 4.0, 1.0, 10.0))]);
        let pods = [pod_of(0, "d"), pod_of(1, "d")];
        let first = chosen(route(&router, "slo-pack-load", &pods));
        let mut held = vec![];
        for _ in 0..3 {
            let next = chosen(route(&router, "slo-pack-load", &pods));
            assert_eq!(next.0, first.0, "packed onto the busiest pod with room");
            held.push(next);
        }
        let fifth = chosen(route(&router, "slo-pack-load", &pods));
        assert_ne!(fifth.0, first.0, "a full pod sends the next to the other");
    }

    #[test]
    fn least_load_pushes_past_capacity() {
        let router = with_profiles(&[("d", profile("d", 1.0, 1.0, 10.0))]);
        let pods = [pod_of(0, "d"), pod_of(1, "d")];
        let held: Vec<_> = (0..6).map(|_| chosen(route(&router, "slo-least-load", &pods))).collect();
        assert_eq!(held.iter().filter(|(name, _)| name == "p0").count(), 3, "spread evenly, never queued");
    }

    #[test]
    fn only_profiled_deployments_are_used_and_a_zero_throughput_refuses() {
        let router = with_profiles(&[("d", profile("d", 2.0, 1.0, 10.0))]);
        let pods = [pod_of(0, "other"), pod_of(1, "d"), pod_of(2, "other")];
        for _ in 0..2 {
            chosen(route(&router, "slo", &pods)).1.call(None);
            assert_eq!(chosen(route(&router, "slo", &pods)).0, "p1");
        }
        let router = with_profiles(&[("d", profile("d", 0.0, 1.0, 10.0))]);
        assert_eq!(route(&router, "slo", &pods).err(), Some(Unroutable::Slo(SloRefusal::SloFailureRequest)));
    }

    #[test]
    fn the_most_relaxed_deployment_goes_first_and_a_violating_one_is_not_tried() {
        // "fast" meets the SLO with room to spare; "slow" expects to miss it.
        let router =
            with_profiles(&[("slow", profile("slow", 1.0, 5.0, 2.0)), ("fast", profile("fast", 1.0, 1.0, 2.0))]);
        let pods = [pod_of(0, "slow"), pod_of(1, "fast")];
        let (first, _held) = chosen(route(&router, "slo", &pods));
        assert_eq!(first, "p1");
        // "fast" is full (one request fills it); "slow" would violate: wait.
        assert!(matches!(route(&router, "slo", &pods), Err(Unroutable::Queued(_))));
    }

    #[test]
    fn without_a_usable_profile_requests_go_by_least_request() {
        let pods = {
            let (busy, guards) = pod(0, 3);
            std::mem::forget(guards);
            [busy, pod(1, 0).0]
        };
        let no_slo = r#"{"gpu":"d","indexes":[[1],[1]],"tputs":[[1]],"e2e":[[1]]}"#.to_owned();
        for router in [router(), with_profiles(&[("", no_slo)])] {
            for name in ["slo", "slo-pack-load", "slo-least-load", "slo-least-load-pulling"] {
                match route(&router, name, &pods) {
                    Ok(Route::Single { pod, decision }) => {
                        assert_eq!(pod.name, "p1", "{name}");
                        assert!(decision.on_usage.is_none(), "no load tracked");
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    #[tokio::test]
    async fn a_waiting_request_is_woken_when_room_is_made_and_refused_past_its_bounds() {
        let router = with_profiles(&[("d", profile("d", 1.0, 1.0, 10.0))]);
        let pods = [pod_of(0, "d")];
        let (_, held) = chosen(route(&router, "slo", &pods));
        let Err(Unroutable::Queued(wait)) = route(&router, "slo", &pods) else { panic!("queued") };
        let started = Instant::now();
        let waiter = tokio::spawn(wait.wait());
        tokio::time::sleep(Duration::from_millis(50)).await;
        held.call(Some(TokenUsage { prompt_tokens: 3, completion_tokens: 40 }));
        waiter.await.expect("woken");
        assert!(started.elapsed() < RECHECK_EVERY, "woken by the end, not the recheck");
        assert_eq!(chosen(route(&router, "slo", &pods)).0, "p0");
        // The queue is bounded.
        let queue = router.slo_state().model(&model()).queue.clone();
        let far = Instant::now() + QUEUE_WAIT;
        let held: Vec<_> = (0..QUEUE_LENGTH).map(|_| queue.enter(far).expect("room in the queue")).collect();
        assert!(queue.enter(far).is_none(), "full");
        drop(held);
        assert!(queue.enter(Instant::now()).is_none(), "past the deadline");
    }

    #[test]
    fn output_lengths_are_predicted_from_what_was_seen() {
        let outputs = OutputLengths::new();
        assert_eq!(outputs.predict(100), 1, "nothing seen: optimistic");
        for _ in 0..10 {
            outputs.record(100, 64);
        }
        assert_eq!(outputs.predict(110), 64, "same log2 bucket of prompt");
        assert_eq!(outputs.predict(10), 1, "another bucket");
    }
}
