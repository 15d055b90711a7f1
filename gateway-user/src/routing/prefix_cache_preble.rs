//! `prefix-cache-preble`: prefix-aware routing that balances load on long
//! matches, after Preble (Srivatsa et al., 2024) and AIBrix's variant.
//!
//! The prompt's blocks are walked down a prefix tree of what each pod was
//! sent (the same chained-hash index as `prefix-cache`, its own instance).
//! When some pod holds more than half of the prompt, recomputing it
//! elsewhere would waste more than it balances: among the pods holding more
//! than half, the least loaded wins ("exploit"). Otherwise the prompt is
//! mostly new anyway and the pod with the lowest cost wins ("explore"): its
//! requests in flight plus the share of the prompt it would have to compute,
//! so load decides and the cache breaks near-ties. AIBrix's imbalance guard
//! applies first.

use std::sync::Arc;
use std::time::Duration;

use super::prefix_cache::{depths, loads_and_eligible};
use super::prefix_index::{PrefixHasher, PrefixIndex, pod_id};
use super::{RouteDecision, RouteRequest, RoutingConfig, Strategy, Unscored};
use crate::discovery::PodInfo;
use crate::metrics::RoutingMetrics;

/// Share of the prompt a pod must hold for the exploit rule.
const LONG_MATCH: f64 = 0.5;

pub struct PrefixCachePreble {
    hasher: Arc<PrefixHasher>,
    index: PrefixIndex,
    imbalance: usize,
    metrics: RoutingMetrics,
}

impl PrefixCachePreble {
    pub fn new(config: &RoutingConfig, hasher: Arc<PrefixHasher>, metrics: RoutingMetrics) -> Self {
        Self {
            hasher,
            index: PrefixIndex::new(
                usize::try_from(config.prefix_cache_block_number).unwrap_or(usize::MAX),
                Duration::from_secs(config.prefix_cache_eviction_duration_mins.saturating_mul(60)),
            ),
            imbalance: usize::try_from(config.prefix_cache_imbalance_abs_count).unwrap_or(usize::MAX),
            metrics,
        }
    }
}

impl Strategy for PrefixCachePreble {
    fn name(&self) -> &'static str {
        "prefix-cache-preble"
    }

    fn score(
        &self,
        request: &RouteRequest<'_>,
        candidates: &[Arc<PodInfo>],
        scores: &mut Vec<f64>,
    ) -> Result<(), Unscored> {
        let hashes = request.prefix_hashes(&self.hasher);
        let (loads, eligible) = loads_and_eligible(candidates, self.imbalance);
        let depths = depths(&self.index, hashes, candidates);
        let total = hashes.len().max(1) as f64;
        let held = |i: usize| depths[i] as f64 / total;
        let exploit = (0..candidates.len()).any(|i| eligible[i] && held(i) > LONG_MATCH);
        // More than any eligible pod's cost can be.
        let excluded = loads.iter().copied().max().unwrap_or(0) as f64 + 2.0;
        scores.clear();
        scores.extend((0..candidates.len()).map(|i| {
            let cost = loads[i] as f64 + (1.0 - held(i));
            if !eligible[i] || (exploit && held(i) <= LONG_MATCH) { cost + excluded } else { cost }
        }));
        Ok(())
    }

    fn chosen(&self, request: &RouteRequest<'_>, pod: &PodInfo, _decision: &mut RouteDecision) {
        let hashes = request.prefix_hashes(&self.hasher);
        let held = self.index.record(hashes, pod_id(&pod.key));
        self.metrics.prefix_lookup(request.model, self.name(), held > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::test_support::*;

    fn strategy() -> PrefixCachePreble {
        let config = RoutingConfig { prefix_cache_block_size: 4, ..RoutingConfig::default() };
        PrefixCachePreble::new(&config, Arc::new(PrefixHasher::new(&config)), crate::metrics::Metrics::new().routing)
    }

    fn route(s: &PrefixCachePreble, prompt: &str, candidates: &[Arc<PodInfo>]) -> usize {
        let model = model();
        let request = RouteRequest::new(&model, prompt.as_bytes());
        let index = s.pick(&request, candidates).expect("always picks");
        s.chosen(&request, &candidates[index], &mut RouteDecision::default());
        index
    }

    #[test]
    fn long_matches_stay_even_when_slightly_busier() {
        let s = strategy();
        let pods = pods(3);
        let prompt = "0123456789abcdefghij".repeat(4);
        let holder = route(&s, &prompt, &pods);
        let _busy: Vec<_> = (0..3).map(|_| pods[holder].load.start()).collect();
        assert_eq!(route(&s, &format!("{prompt}0123"), &pods), holder, "more than half held: exploit");
    }

    #[test]
    fn among_long_matches_the_least_loaded_wins() {
        let s = strategy();
        let pods = pods(3);
        let prompt = "0123456789abcdefghij".repeat(4);
        let model = model();
        let request = RouteRequest::new(&model, prompt.as_bytes());
        s.chosen(&request, &pods[0], &mut RouteDecision::default());
        s.chosen(&request, &pods[1], &mut RouteDecision::default());
        let _busy = pods[0].load.start();
        assert_eq!(s.pick(&request, &pods), Ok(1));
    }

    #[test]
    fn short_matches_balance_load_first() {
        let s = strategy();
        let pods = pods(2);
        let shared = "0123456789ab";
        let holder = route(&s, shared, &pods);
        let _busy = pods[holder].load.start();
        // A third of the prompt held: explore, the idle pod costs less.
        let prompt = format!("{shared}{}", "x".repeat(24));
        assert_ne!(route(&s, &prompt, &pods), holder);
    }

    #[test]
    fn equal_load_goes_to_the_longer_match() {
        let s = strategy();
        let pods = pods(3);
        let model = model();
        let request = RouteRequest::new(&model, b"0123456789ab");
        s.chosen(&request, &pods[2], &mut RouteDecision::default());
        let prompt = format!("0123456789ab{}", "y".repeat(36));
        assert_eq!(route(&s, &prompt, &pods), 2, "a quarter held, equal load");
    }

    #[test]
    fn new_prompts_on_equal_pods_are_shared() {
        let s = strategy();
        let pods = pods(3);
        let model = model();
        let request = RouteRequest::new(&model, b"never seen before, long enough for blocks");
        let seen = spread(3, 300, || s.pick(&request, &pods).expect("picks"));
        assert!(seen.iter().all(|&n| n > 50), "ties at random: {seen:?}");
    }

    #[test]
    fn single_pod_and_empty_prompt() {
        let s = strategy();
        let pods = pods(1);
        assert_eq!(route(&s, "", &pods), 0);
        assert_eq!(route(&s, "abcdefgh", &pods), 0);
    }
}
