//! `pd`: prefill/decode disaggregation, as AIBrix's `pd` strategy. A request is
//! prefilled on one pod and decoded on another, and the two must share a KV
//! transfer domain: a roleset (pod label `roleset-name`, role from
//! `role-name`).
//!
//! Only rolesets with at least one ready prefill and one ready decode pod
//! are eligible, so a roleset half-way through a rollout is skipped rather
//! than half used. Within each eligible roleset the best prefill pod is the
//! one with the fewest prefills in flight, with a bonus for holding a prefix
//! of the prompt (the shared [`super::prefix_index`] learns which prefill pod
//! saw which prompt); the best decode pod is the one with the fewest
//! requests in flight. The roleset whose pair costs least wins, ties at
//! random.
//!
//! This module only chooses ([`super::Router::route`] returns the pair as
//! [`super::Route::Disaggregated`]); the two requests are the proxy's.

use std::sync::Arc;
use std::time::Duration;

use super::prefix_index::{PrefixHasher, PrefixIndex, pod_id};
use super::ties::{Cost, Lowest};
use super::{RouteRequest, RoutingConfig, Strategy, Unscored};
use crate::discovery::{PodInfo, Role};

/// The strategy name.
pub const NAME: &str = "pd";

/// What a prefill pod holding none of the prompt costs over one holding all
/// of it, in prefills in flight: a cached prefix saves prefill compute, but a
/// queue of more than a couple of prefills costs more than it saves.
const PREFIX_MISS_COST: f64 = 2.0;

/// The ready prefill and decode pods of one roleset.
#[derive(Debug)]
pub struct Roleset<'a> {
    /// `roleset-name` (empty for pods with a role but no roleset label).
    pub name: &'a str,
    pub prefill: Vec<&'a Arc<PodInfo>>,
    pub decode: Vec<&'a Arc<PodInfo>>,
}

impl Roleset<'_> {
    /// Whether the roleset can serve a request: one ready pod of each role.
    pub fn is_eligible(&self) -> bool {
        !self.prefill.is_empty() && !self.decode.is_empty()
    }
}

/// Groups the ready prefill and decode pods among `candidates` by roleset,
/// ordered by roleset name. Pods without a PD role are not part of any.
pub fn rolesets(candidates: &[Arc<PodInfo>]) -> Vec<Roleset<'_>> {
    let mut sets: Vec<Roleset<'_>> = Vec::new();
    for pod in candidates.iter().filter(|p| p.ready && p.role != Role::Combined) {
        let name = pod.roleset.as_deref().unwrap_or("");
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

/// Where one request's two halves go.
#[derive(Clone, Debug)]
pub struct PdPlan {
    pub roleset: String,
    pub prefill: Arc<PodInfo>,
    pub decode: Arc<PodInfo>,
}

/// No eligible roleset: how many ready pods of each role there were, for the
/// error message.
#[derive(Debug, PartialEq, Eq)]
pub struct NoRoleset {
    pub prefill: usize,
    pub decode: usize,
}

/// The `pd` strategy: chooses the prefill/decode pair and remembers prompt
/// prefixes per prefill pod.
pub struct PdRouter {
    hasher: Arc<PrefixHasher>,
    index: PrefixIndex,
}

impl PdRouter {
    pub fn new(config: &RoutingConfig, hasher: Arc<PrefixHasher>) -> Self {
        Self {
            hasher,
            index: PrefixIndex::new(
                usize::try_from(config.prefix_cache_block_number).unwrap_or(usize::MAX),
                Duration::from_secs(config.prefix_cache_eviction_duration_mins.saturating_mul(60)),
            ),
        }
    }

    /// Chooses a prefill and a decode pod of one eligible roleset among
    /// `candidates`, and records the prompt's prefix for the prefill pod.
    pub fn plan(&self, request: &RouteRequest<'_>, candidates: &[Arc<PodInfo>]) -> Result<PdPlan, NoRoleset> {
        let sets = rolesets(candidates);
        let hashes = request.prefix_hashes(&self.hasher);
        let mut best = Lowest::new();
        for set in sets.iter().filter(|s| s.is_eligible()) {
            let Some((prefill_cost, prefill)) = self.best_prefill(hashes, &set.prefill) else { continue };
            let Some((decode_cost, decode)) = least_loaded(&set.decode) else { continue };
            best.offer(Cost(prefill_cost + decode_cost), (prefill, decode, set.name));
        }
        let Some((prefill, decode, roleset)) = best.into_item() else {
            return Err(NoRoleset {
                prefill: sets.iter().map(|s| s.prefill.len()).sum(),
                decode: sets.iter().map(|s| s.decode.len()).sum(),
            });
        };
        self.index.record(hashes, pod_id(&prefill.key));
        Ok(PdPlan { roleset: roleset.to_owned(), prefill: Arc::clone(prefill), decode: Arc::clone(decode) })
    }

    /// The cheapest prefill pod: prefills in flight, plus the share of the
    /// prompt it does not hold times [`PREFIX_MISS_COST`]; ties at random.
    fn best_prefill<'a>(&self, hashes: &[u64], pods: &[&'a Arc<PodInfo>]) -> Option<(f64, &'a Arc<PodInfo>)> {
        let ids: Vec<u64> = pods.iter().map(|p| pod_id(&p.key)).collect();
        let mut depths = Vec::with_capacity(pods.len());
        self.index.match_depths(hashes, &ids, &mut depths);
        let blocks = hashes.len().max(1) as f64;
        let costs = pods.iter().zip(&depths).map(|(pod, &depth)| {
            let missed = if hashes.is_empty() { 1.0 } else { 1.0 - depth as f64 / blocks };
            (pod.load.routing_load() as f64 + PREFIX_MISS_COST * missed, *pod)
        });
        cheapest(costs)
    }
}

/// The pod with the fewest requests in flight, ties at random.
fn least_loaded<'a>(pods: &[&'a Arc<PodInfo>]) -> Option<(f64, &'a Arc<PodInfo>)> {
    cheapest(pods.iter().map(|pod| (pod.load.routing_load() as f64, *pod)))
}

/// The lowest cost, ties at random.
fn cheapest<'a>(costs: impl Iterator<Item = (f64, &'a Arc<PodInfo>)>) -> Option<(f64, &'a Arc<PodInfo>)> {
    let mut best = Lowest::new();
    for (cost, pod) in costs {
        best.offer(Cost(cost), pod);
    }
    best.into_best().map(|(Cost(cost), pod)| (cost, pod))
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

    /// The decode pod of the plan: where the answer comes from. The proxy
    /// calls [`PdRouter::plan`] itself; this only serves callers that route
    /// a single pod.
    fn pick(&self, request: &RouteRequest<'_>, candidates: &[Arc<PodInfo>]) -> Result<usize, Unscored> {
        let plan = self.plan(request, candidates).map_err(|_| Unscored::NotScorable)?;
        candidates.iter().position(|p| p.key == plan.decode.key).ok_or(Unscored::NotScorable)
    }

    fn mixable(&self) -> bool {
        false
    }

    fn plan_pair(&self, request: &RouteRequest<'_>, candidates: &[Arc<PodInfo>]) -> Option<Result<PdPlan, NoRoleset>> {
        Some(self.plan(request, candidates))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::test_support::*;

    /// A pod `p<i>` of `roleset` in `role` with `in_flight` requests.
    fn pd_pod(
        i: u16,
        roleset: &str,
        role: Role,
        in_flight: usize,
    ) -> (Arc<PodInfo>, Vec<crate::discovery::InFlightGuard>) {
        let (base, guards) = pod(i, in_flight);
        let mut info = (*base).clone();
        info.name = format!("{roleset}-{}-{i}", if role == Role::Prefill { "prefill" } else { "decode" });
        info.key = format!("default/{}", info.name);
        info.roleset = Some(roleset.to_owned());
        info.role = role;
        (Arc::new(info), guards)
    }

    fn router() -> PdRouter {
        let config = RoutingConfig { prefix_cache_block_size: 4, ..RoutingConfig::default() };
        PdRouter::new(&config, Arc::new(PrefixHasher::new(&config)))
    }

    fn not_ready(pod: &PodInfo) -> Arc<PodInfo> {
        let mut info = pod.clone();
        info.ready = false;
        Arc::new(info)
    }

    #[test]
    fn groups_ready_pods_by_roleset_and_role() {
        let pods = vec![
            pd_pod(0, "rs-b", Role::Prefill, 0).0,
            pd_pod(1, "rs-a", Role::Decode, 0).0,
            pd_pod(2, "rs-a", Role::Prefill, 0).0,
            not_ready(&pd_pod(3, "rs-b", Role::Decode, 0).0),
            pod(4, 0).0, // no role: not part of any roleset
        ];
        let sets = rolesets(&pods);
        let summary: Vec<(&str, usize, usize, bool)> =
            sets.iter().map(|s| (s.name, s.prefill.len(), s.decode.len(), s.is_eligible())).collect();
        assert_eq!(summary, [("rs-a", 1, 1, true), ("rs-b", 1, 0, false)]);
    }

    #[test]
    fn a_roleset_without_a_ready_decode_pod_is_skipped() {
        let r = router();
        let model = model();
        let request = RouteRequest::new(&model, b"hello there");
        let pods = vec![
            // rs-new is idle but its decode pod is still starting.
            pd_pod(0, "rs-new", Role::Prefill, 0).0,
            not_ready(&pd_pod(1, "rs-new", Role::Decode, 0).0),
            pd_pod(2, "rs-old", Role::Prefill, 3).0,
            pd_pod(3, "rs-old", Role::Decode, 3).0,
        ];
        for _ in 0..20 {
            let plan = r.plan(&request, &pods).expect("rs-old is complete");
            assert_eq!(plan.roleset, "rs-old");
            assert_eq!(
                (plan.prefill.name.as_str(), plan.decode.name.as_str()),
                ("rs-old-prefill-2", "rs-old-decode-3")
            );
        }
    }

    #[test]
    fn no_complete_roleset_says_what_was_ready() {
        let r = router();
        let model = model();
        let request = RouteRequest::new(&model, b"x");
        let pods = vec![pd_pod(0, "a", Role::Prefill, 0).0, pd_pod(1, "b", Role::Decode, 0).0, pod(2, 0).0];
        assert_eq!(r.plan(&request, &pods).err(), Some(NoRoleset { prefill: 1, decode: 1 }));
        assert_eq!(r.plan(&request, &[]).err(), Some(NoRoleset { prefill: 0, decode: 0 }));
    }

    #[test]
    fn both_halves_come_from_one_roleset_and_the_least_loaded_pair_wins() {
        let r = router();
        let model = model();
        let request = RouteRequest::new(&model, b"short");
        // rs-a: idle prefill but busy decode; rs-b: both moderately loaded.
        let (a_p, _g1) = pd_pod(0, "rs-a", Role::Prefill, 0);
        let (a_d, _g2) = pd_pod(1, "rs-a", Role::Decode, 5);
        let (b_p, _g3) = pd_pod(2, "rs-b", Role::Prefill, 1);
        let (b_d, _g4) = pd_pod(3, "rs-b", Role::Decode, 1);
        let (b_d2, _g5) = pd_pod(4, "rs-b", Role::Decode, 3);
        let pods = vec![a_p, a_d, b_p, b_d, b_d2];
        let plan = r.plan(&request, &pods).expect("plan");
        assert_eq!(plan.roleset, "rs-b");
        assert_eq!(plan.prefill.name, "rs-b-prefill-2");
        assert_eq!(plan.decode.name, "rs-b-decode-3", "least loaded decode pod of the roleset");
    }

    #[test]
    fn equal_rolesets_share_the_load() {
        let r = router();
        let model = model();
        let request = RouteRequest::new(&model, b"x");
        let pods = vec![
            pd_pod(0, "rs-a", Role::Prefill, 0).0,
            pd_pod(1, "rs-a", Role::Decode, 0).0,
            pd_pod(2, "rs-b", Role::Prefill, 0).0,
            pd_pod(3, "rs-b", Role::Decode, 0).0,
        ];
        let seen = spread(2, 200, || usize::from(r.plan(&request, &pods).expect("plan").roleset == "rs-b"));
        assert!(seen[0] > 50 && seen[1] > 50, "{seen:?}");
    }

    #[test]
    fn a_prompt_returns_to_the_prefill_pod_holding_its_prefix_unless_it_is_busy() {
        let r = router();
        let model = model();
        let (p0, _g0) = pd_pod(0, "rs", Role::Prefill, 0);
        let (p1, _g1) = pd_pod(1, "rs", Role::Prefill, 0);
        let (d, _g2) = pd_pod(2, "rs", Role::Decode, 0);
        let pods = vec![Arc::clone(&p0), Arc::clone(&p1), d];
        let system = "You are a helpful assistant. Answer briefly. ";
        let first =
            r.plan(&RouteRequest::new(&model, format!("{system}question one").as_bytes()), &pods).expect("plan");
        for turn in 0..5 {
            let prompt = format!("{system}question one and follow-up {turn}");
            let plan = r.plan(&RouteRequest::new(&model, prompt.as_bytes()), &pods).expect("plan");
            assert_eq!(plan.prefill.key, first.prefill.key, "turn {turn}");
        }
        // Three prefills queued on the holder outweigh the cached prefix.
        let holder = if first.prefill.key == p0.key { &p0 } else { &p1 };
        let _busy: Vec<_> = (0..3).map(|_| holder.load.start()).collect();
        let prompt = format!("{system}question one, once more");
        let plan = r.plan(&RouteRequest::new(&model, prompt.as_bytes()), &pods).expect("plan");
        assert_ne!(plan.prefill.key, holder.key);
    }

    #[test]
    fn pd_is_a_strategy_of_its_own_and_not_mixable() {
        let r = router();
        assert_eq!(r.name(), "pd");
        assert!(!r.mixable());
        let model = model();
        let request = RouteRequest::new(&model, b"x");
        let pods = vec![pd_pod(0, "rs", Role::Prefill, 0).0, pd_pod(1, "rs", Role::Decode, 0).0];
        assert_eq!(r.pick(&request, &pods), Ok(1), "the decode pod answers");
    }
}
