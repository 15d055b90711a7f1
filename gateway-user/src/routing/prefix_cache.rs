//! `prefix-cache`: send a prompt where its longest prefix was sent before,
//! so the engine's prefix cache skips recomputing it.
//!
//! As AIBrix does: when the model's pods differ in requests in flight by more
//! than the imbalance count (8), only the least loaded are considered. Among
//! pods holding a prefix of the prompt (see [`super::prefix_index`]), the one
//! holding the longest wins, unless its in-flight count is above the mean by
//! more than the standard-deviation factor, in which case the next longest
//! is tried. Without such a pod the choice is least-request's. Whatever is
//! chosen, the prompt's blocks are then recorded for that pod, and a hit or
//! a miss is counted.
//!
//! One rule is Turnstile's own: when the longest prefix held is one prompts
//! went on past in three or more ways (a system prompt many conversations
//! share, rather than this conversation's history), a holder is taken only
//! while its load is at most one above the mean; otherwise the least loaded
//! pod takes the prompt and learns the prefix. A new conversation costs the
//! shared prefix once wherever it starts, and its later turns match its
//! own history, where AIBrix's rule keeps them: so conversations are spread
//! by load, and a prefix that replicas placed on one pod in the same
//! instant does not keep that pod overloaded.
//!
//! In a weighted mix its score is the share of the prompt the pod does not
//! hold, load being left to the other strategies.

use std::sync::Arc;
use std::time::Duration;

use super::prefix_index::{PrefixHasher, PrefixIndex, pod_id};
use super::ties::Lowest;
use super::{RouteDecision, RouteRequest, RoutingConfig, Strategy, Unscored, least_in_flight};
use crate::discovery::PodInfo;
use crate::metrics::RoutingMetrics;

pub struct PrefixCache {
    hasher: Arc<PrefixHasher>,
    /// Shared with the other replicas through [`super::fleet`].
    index: Arc<PrefixIndex>,
    fleet: Arc<super::fleet::Link>,
    imbalance: usize,
    deviation_factor: f64,
    metrics: RoutingMetrics,
}

impl PrefixCache {
    /// A prefix index sized by `config`.
    pub fn index(config: &RoutingConfig) -> PrefixIndex {
        PrefixIndex::new(
            usize::try_from(config.prefix_cache_block_number).unwrap_or(usize::MAX),
            Duration::from_secs(config.prefix_cache_eviction_duration_mins.saturating_mul(60)),
        )
    }

    /// Routes by `index`, telling the other replicas each decision through `fleet`.
    pub fn new(
        config: &RoutingConfig,
        hasher: Arc<PrefixHasher>,
        index: Arc<PrefixIndex>,
        fleet: Arc<super::fleet::Link>,
        metrics: RoutingMetrics,
    ) -> Self {
        Self {
            hasher,
            index,
            fleet,
            imbalance: usize::try_from(config.prefix_cache_imbalance_abs_count).unwrap_or(usize::MAX),
            deviation_factor: config.prefix_cache_standard_deviation_factor,
            metrics,
        }
    }
}

/// The candidates' in-flight counts, and which of them are considered: all,
/// or only the least loaded when the spread exceeds `imbalance`.
pub(super) fn loads_and_eligible(candidates: &[Arc<PodInfo>], imbalance: usize) -> (Vec<usize>, Vec<bool>) {
    let loads: Vec<usize> = candidates.iter().map(|p| p.load.routing_load()).collect();
    let min = loads.iter().copied().min().unwrap_or(0);
    let max = loads.iter().copied().max().unwrap_or(0);
    let eligible = loads.iter().map(|&l| max - min <= imbalance || l == min).collect();
    (loads, eligible)
}

/// How many leading blocks of the prompt each candidate holds.
pub(super) fn depths(index: &PrefixIndex, hashes: &[u64], candidates: &[Arc<PodInfo>]) -> Vec<usize> {
    depths_and_shared(index, hashes, candidates).0
}

/// [`depths`], and whether each candidate's deepest block is a shared prefix.
fn depths_and_shared(index: &PrefixIndex, hashes: &[u64], candidates: &[Arc<PodInfo>]) -> (Vec<usize>, Vec<bool>) {
    let ids: Vec<u64> = candidates.iter().map(|p| pod_id(&p.key)).collect();
    let (mut depths, mut shared) = (Vec::with_capacity(candidates.len()), Vec::with_capacity(candidates.len()));
    index.match_prefix(hashes, &ids, &mut depths, &mut shared);
    (depths, shared)
}

impl Strategy for PrefixCache {
    fn name(&self) -> &'static str {
        "prefix-cache"
    }

    fn score(
        &self,
        request: &RouteRequest<'_>,
        candidates: &[Arc<PodInfo>],
        scores: &mut Vec<f64>,
    ) -> Result<(), Unscored> {
        let hashes = request.prefix_hashes(&self.hasher);
        let (_, eligible) = loads_and_eligible(candidates, self.imbalance);
        let depths = depths(&self.index, hashes, candidates);
        let total = hashes.len().max(1) as f64;
        scores.clear();
        scores.extend(depths.iter().zip(&eligible).map(|(&d, &ok)| if ok { 1.0 - d as f64 / total } else { 1.0 }));
        Ok(())
    }

    fn pick(&self, request: &RouteRequest<'_>, candidates: &[Arc<PodInfo>]) -> Result<usize, Unscored> {
        let hashes = request.prefix_hashes(&self.hasher);
        let (loads, eligible) = loads_and_eligible(candidates, self.imbalance);
        let (depths, shared) = depths_and_shared(&self.index, hashes, candidates);
        let n = loads.len() as f64;
        let mean = loads.iter().map(|&l| l as f64).sum::<f64>() / n.max(1.0);
        let variance = if loads.len() > 1 {
            loads.iter().map(|&l| (l as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        let mut ceiling = mean + self.deviation_factor * variance.sqrt();
        // The deepest prefix held is shared with other prompts: spread by load.
        let deepest_depth = (0..candidates.len()).filter(|&i| eligible[i]).map(|i| depths[i]).max().unwrap_or(0);
        if (0..candidates.len()).any(|i| eligible[i] && depths[i] == deepest_depth && deepest_depth > 0 && shared[i]) {
            ceiling = ceiling.min(mean + 1.0);
        }
        // Deepest match first, then fewer in flight, then this replica's
        // share of the pods, then chance.
        let turn = super::fleet::turn_of();
        let mut deepest = Lowest::new();
        for i in 0..candidates.len() {
            if !eligible[i] || depths[i] == 0 || loads[i] as f64 > ceiling {
                continue;
            }
            deepest.offer((std::cmp::Reverse(depths[i]), loads[i], turn.not_mine(i, candidates.len())), i);
        }
        if let Some(best) = deepest.into_item() {
            return Ok(best);
        }
        if eligible.iter().all(|&e| e) {
            return Ok(least_in_flight(candidates));
        }
        // Imbalanced: least-request among the least loaded.
        let mut least = Lowest::new();
        for i in (0..candidates.len()).filter(|&i| eligible[i]) {
            least.offer((loads[i], turn.not_mine(i, candidates.len())), i);
        }
        Ok(least.into_item().unwrap_or(0))
    }

    fn chosen(&self, request: &RouteRequest<'_>, pod: &PodInfo, _decision: &mut RouteDecision) {
        let hashes = request.prefix_hashes(&self.hasher);
        let held = self.index.record(hashes, pod_id(&pod.key));
        self.metrics.prefix_lookup(request.model, self.name(), held > 0);
        self.metrics.prefix_match(request.model, held, hashes.len());
        if self.fleet.is_sharing() {
            self.fleet.send(super::fleet::Event::prefix(&pod.key, hashes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::test_support::*;

    fn strategy() -> PrefixCache {
        let config = RoutingConfig { prefix_cache_block_size: 4, ..RoutingConfig::default() };
        with_metrics(&config, crate::metrics::Metrics::new().routing)
    }

    fn with_metrics(config: &RoutingConfig, metrics: RoutingMetrics) -> PrefixCache {
        let hasher = Arc::new(PrefixHasher::new(config));
        PrefixCache::new(config, hasher, Arc::new(PrefixCache::index(config)), Arc::default(), metrics)
    }

    /// Routes `prompt` as the router would (pick, then chosen).
    fn route(s: &PrefixCache, prompt: &str, candidates: &[Arc<PodInfo>]) -> usize {
        let model = model();
        let request = RouteRequest::new(&model, prompt.as_bytes());
        let index = s.pick(&request, candidates).expect("always picks");
        s.chosen(&request, &candidates[index], &mut RouteDecision::default());
        index
    }

    const SYSTEM: &str = "You are a helpful assistant. Answer briefly. ";

    #[test]
    fn follow_ups_return_to_the_pod_holding_the_conversation() {
        let s = strategy();
        let pods = pods(4);
        let first = route(&s, &format!("{SYSTEM}user: hello"), &pods);
        for turn in 1..10 {
            let prompt = format!("{SYSTEM}user: hello assistant: hi {}", "more words ".repeat(turn));
            assert_eq!(route(&s, &prompt, &pods), first, "turn {turn}");
        }
    }

    #[test]
    fn without_a_match_it_is_least_request() {
        let s = strategy();
        let (a, _ga) = pod(0, 2);
        let (b, _gb) = pod(1, 0);
        let (c, _gc) = pod(2, 1);
        assert_eq!(route(&s, "a prompt nobody has seen before", &[a, b, c]), 1);
    }

    #[test]
    fn an_overloaded_holder_is_skipped() {
        let config = RoutingConfig {
            prefix_cache_block_size: 4,
            prefix_cache_standard_deviation_factor: 1.0,
            ..RoutingConfig::default()
        };
        let s = with_metrics(&config, crate::metrics::Metrics::new().routing);
        let pods = pods(4);
        let prompt = format!("{SYSTEM}user: a long question");
        let holder = route(&s, &prompt, &pods);
        // Loads [4,0,0,0] (in some order): mean 1, σ 2, ceiling 3.
        let _busy: Vec<_> = (0..4).map(|_| pods[holder].load.start()).collect();
        assert_ne!(route(&s, &prompt, &pods), holder);
    }

    #[test]
    fn the_default_factor_tolerates_a_small_excess() {
        let s = strategy();
        let pods = pods(4);
        let prompt = format!("{SYSTEM}user: a question");
        let holder = route(&s, &prompt, &pods);
        let _others: Vec<_> = pods.iter().map(|p| p.load.start()).collect();
        let _extra = pods[holder].load.start();
        // Loads [2,1,1,1]: mean 1.25, σ 0.5, ceiling 2.25.
        assert_eq!(route(&s, &prompt, &pods), holder);
    }

    #[test]
    fn a_shared_prefix_on_a_busy_pod_goes_to_the_least_loaded_a_history_stays() {
        let s = strategy();
        let pods = pods(4);
        // Three conversations under one system prompt, on the pod that holds it.
        let first = route(&s, &format!("{SYSTEM}user: first conversation"), &pods);
        route(&s, &format!("{SYSTEM}user: my other one"), &[Arc::clone(&pods[first])]);
        route(&s, &format!("{SYSTEM}user: the third one"), &[Arc::clone(&pods[first])]);
        let _load: Vec<_> = (0..3).map(|_| pods[first].load.start()).collect();
        let other = format!("{SYSTEM}user: second conversation");
        // Loads [3,0,0,0]: mean 0.75, σ 1.5, the AIBrix ceiling 3.75 would keep it;
        // shared, the bound is 1.75.
        let second = route(&s, &other, &pods);
        assert_ne!(second, first, "a new conversation starts on a less loaded pod");
        // Its next turn stays where it started, and the first conversation's too.
        assert_eq!(route(&s, &format!("{other} assistant: ok user: more"), &pods), second);
        assert_eq!(route(&s, &format!("{SYSTEM}user: first conversation assistant: ok user: more"), &pods), first);
    }

    #[test]
    fn imbalance_restricts_to_the_least_loaded() {
        let s = strategy();
        let pods = pods(3);
        let prompt = format!("{SYSTEM}user: question");
        let holder = route(&s, &prompt, &pods);
        let _busy: Vec<_> = (0..9).map(|_| pods[holder].load.start()).collect();
        for _ in 0..10 {
            assert_ne!(route(&s, &prompt, &pods), holder, "spread 9 > 8: the holder is not considered");
        }
    }

    #[test]
    fn ties_between_equal_holders_are_shared() {
        let s = strategy();
        let pods = pods(2);
        let prompt = format!("{SYSTEM}user: same");
        // Both pods hold the prompt.
        let model = model();
        let request = RouteRequest::new(&model, prompt.as_bytes());
        for pod in &pods {
            s.chosen(&request, pod, &mut RouteDecision::default());
        }
        let seen = spread(2, 200, || s.pick(&request, &pods).expect("picks"));
        assert!(seen[0] > 50 && seen[1] > 50, "{seen:?}");
    }

    #[test]
    fn counts_hits_and_misses() {
        let metrics = crate::metrics::Metrics::new();
        let config = RoutingConfig { prefix_cache_block_size: 4, ..RoutingConfig::default() };
        let s = with_metrics(&config, metrics.routing.clone());
        let pods = pods(1);
        route(&s, "abcdefgh", &pods);
        route(&s, "abcdefgh", &pods);
        route(&s, "zzzzzzzz", &pods);
        let text = metrics.render();
        assert!(
            text.contains(
                r#"aibrix_gateway_prefix_cache_lookups_total{model="m",strategy="prefix-cache",result="hit"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"aibrix_gateway_prefix_cache_lookups_total{model="m",strategy="prefix-cache",result="miss"} 2"#
            ),
            "{text}"
        );
    }

    #[test]
    fn mix_scores_are_the_share_not_held() {
        let s = strategy();
        let pods = pods(2);
        route(&s, "aaaabbbb", &[Arc::clone(&pods[0])]);
        let model = model();
        let request = RouteRequest::new(&model, b"aaaacccc");
        let mut scores = Vec::new();
        s.score(&request, &pods, &mut scores).expect("scores");
        assert_eq!(scores, [0.5, 1.0]);
    }

    #[test]
    fn single_pod_and_short_prompts() {
        let s = strategy();
        let pods = pods(1);
        assert_eq!(route(&s, "abc", &pods), 0);
        assert_eq!(route(&s, "", &pods), 0);
    }
}
