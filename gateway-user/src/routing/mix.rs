//! The weighted mix `name:weight,name:weight`: several strategies' scores,
//! each min-max normalised to 0..1 (1 = that strategy's best pod), summed by
//! weight; the highest total wins.
//!
//! As in AIBrix: weights are integers 0..=1000000, default 1, and a weight
//! of 0 drops the entry; an empty name, a bad weight or an all-zero list make
//! the whole string invalid. If an entry is `pd` or starts with `slo`, the
//! first such entry is used alone and the others are ignored (AIBrix's
//! exclusive strategies); otherwise names must be strategies that score (not
//! `random` or `power-of-two`). A strategy that cannot score this request adds
//! nothing (its fallback is counted under its own name); if none can, the
//! router falls back as for a single strategy.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Fallbacks, RouteDecision, RouteRequest, Strategy, StrategyError, Unscored};
use crate::discovery::PodInfo;

const MAX_WEIGHT: u32 = 1_000_000;

pub struct WeightedMix {
    /// Strategies with their share of the total weight.
    parts: Vec<(Arc<dyn Strategy>, f64)>,
    fallbacks: Arc<Fallbacks>,
}

/// Whether AIBrix uses this entry of a mix alone.
fn exclusive(name: &str) -> bool {
    name == "pd" || name.starts_with("slo")
}

impl WeightedMix {
    /// Parses `spec` against the registered strategies: a mix, or the
    /// exclusive strategy it names.
    pub(super) fn parse(
        spec: &str,
        strategies: &HashMap<&'static str, Arc<dyn Strategy>>,
        fallbacks: Arc<Fallbacks>,
    ) -> Result<Arc<dyn Strategy>, StrategyError> {
        let mut items = Vec::new();
        for item in spec.split(',') {
            let (name, weight) = match item.split_once(':') {
                Some((name, weight)) => (name.trim(), weight.trim()),
                None => (item.trim(), "1"),
            };
            let weight: u32 = weight.parse().map_err(|_| StrategyError::Unknown)?;
            if name.is_empty() || weight > MAX_WEIGHT {
                return Err(StrategyError::Unknown);
            }
            if weight > 0 {
                items.push((name, weight));
            }
        }
        if let Some((name, _)) = items.iter().find(|(name, _)| exclusive(name)) {
            return strategies.get(name).cloned().ok_or(StrategyError::Unknown);
        }
        let mut parts = Vec::new();
        for (name, weight) in items {
            let strategy = strategies.get(name).filter(|s| s.mixable()).ok_or(StrategyError::Unknown)?;
            parts.push((Arc::clone(strategy), f64::from(weight)));
        }
        let total: f64 = parts.iter().map(|(_, w)| w).sum();
        if parts.is_empty() || total <= 0.0 {
            return Err(StrategyError::Unknown);
        }
        for (_, weight) in &mut parts {
            *weight /= total;
        }
        Ok(Arc::new(Self { parts, fallbacks }))
    }
}

impl Strategy for WeightedMix {
    fn name(&self) -> &'static str {
        // One bounded metric label for every mix; the response echoes the string.
        "weighted-mix"
    }

    fn score(
        &self,
        request: &RouteRequest<'_>,
        candidates: &[Arc<PodInfo>],
        scores: &mut Vec<f64>,
    ) -> Result<(), Unscored> {
        let mut total = vec![0.0; candidates.len()];
        let mut part_scores = Vec::with_capacity(candidates.len());
        let mut first_failure = None;
        let mut scored_any = false;
        for (strategy, weight) in &self.parts {
            if let Err(reason) = strategy.score(request, candidates, &mut part_scores) {
                self.fallbacks.record(strategy.name(), reason);
                first_failure.get_or_insert(reason);
                continue;
            }
            if part_scores.len() != candidates.len() {
                continue;
            }
            scored_any = true;
            let finite = part_scores.iter().copied().filter(|s| s.is_finite());
            let (min, max) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), s| (lo.min(s), hi.max(s)));
            for (sum, raw) in total.iter_mut().zip(&part_scores) {
                let normalised = if !raw.is_finite() {
                    0.0
                } else if max - min <= f64::EPSILON * max.abs().max(1.0) {
                    1.0
                } else {
                    (max - raw) / (max - min)
                };
                *sum += normalised * weight;
            }
        }
        if !scored_any {
            return Err(first_failure.unwrap_or(Unscored::NotScorable));
        }
        scores.clear();
        // The highest total wins; scores are "lower is better".
        scores.extend(total.iter().map(|t| -t));
        Ok(())
    }

    fn chosen(&self, request: &RouteRequest<'_>, pod: &PodInfo, decision: &mut RouteDecision) {
        for (strategy, _) in &self.parts {
            strategy.chosen(request, pod, decision);
        }
    }

    fn samples_large_fleets(&self) -> bool {
        self.parts.iter().all(|(strategy, _)| strategy.samples_large_fleets())
    }

    fn mixable(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case::two("least-request:1,least-kv-cache:3")]
    #[case::default_weight("least-request,prefix-cache:2")]
    #[case::spaces(" least-request : 2 , throughput : 1 ")]
    #[case::single("least-latency:5")]
    #[case::zero_drops_one("least-request:0,least-kv-cache:1")]
    #[case::max_weight("least-request:1000000")]
    fn valid_mixes(#[case] spec: &str) {
        assert_eq!(router().strategy(spec).map(|s| s.name()).ok(), Some("weighted-mix"), "{spec}");
    }

    #[rstest]
    #[case::unknown_name("least-request:1,bogus:1", StrategyError::Unknown)]
    #[case::empty_name("least-request:1,:1", StrategyError::Unknown)]
    #[case::trailing_comma("least-request:1,", StrategyError::Unknown)]
    #[case::bad_weight("least-request:x", StrategyError::Unknown)]
    #[case::negative_weight("least-request:-1", StrategyError::Unknown)]
    #[case::fraction("least-request:0.5", StrategyError::Unknown)]
    #[case::too_heavy("least-request:1000001", StrategyError::Unknown)]
    #[case::all_zero("least-request:0,throughput:0", StrategyError::Unknown)]
    #[case::random_does_not_score("random:1,least-request:1", StrategyError::Unknown)]
    #[case::power_of_two_does_not_score("power-of-two:1,least-request:1", StrategyError::Unknown)]
    #[case::exclusive_but_unknown("least-request:1,slo-bogus:1", StrategyError::Unknown)]
    #[case::exclusive_with_a_bad_weight("slo:1,least-request:x", StrategyError::Unknown)]
    #[case::double_colon("least-request:1:2", StrategyError::Unknown)]
    fn invalid_mixes(#[case] spec: &str, #[case] error: StrategyError) {
        assert_eq!(router().strategy(spec).err(), Some(error), "{spec}");
    }

    #[rstest]
    #[case::slo_after("least-request:1,slo-least-load", "slo-least-load")]
    #[case::first_exclusive_wins("throughput:2,slo-pack-load:1,pd:1,slo", "slo-pack-load")]
    #[case::pd("pd:1,least-request:1", "pd")]
    #[case::others_not_checked("bogus:1,slo:3", "slo")]
    #[case::zero_weight_drops_it("slo:0,least-request:1", "weighted-mix")]
    fn an_exclusive_entry_is_used_alone(#[case] spec: &str, #[case] name: &str) {
        assert_eq!(router().strategy(spec).map(|s| s.name()).ok(), Some(name), "{spec}");
    }

    #[test]
    fn weights_decide_between_disagreeing_strategies() {
        // Pod 0: idle at the gateway but a full KV cache; pod 1: busy, empty cache.
        let (p0, _g0) = pod(0, 0);
        let (p1, _g1) = pod(1, 4);
        let pods = [p0, p1];
        let model = model();
        let metrics =
            view(vec![Some(fresh(|m| m.kv_cache_usage = Some(0.9))), Some(fresh(|m| m.kv_cache_usage = Some(0.1)))]);
        let request = RouteRequest::new(&model, b"{}").with_metrics(metrics);
        let router = router();
        let kv_heavy = router.strategy("least-request:1,least-kv-cache:3").expect("valid");
        assert_eq!(router.decide(kv_heavy.as_ref(), &request, &pods).index, 1);
        let load_heavy = router.strategy("least-request:3,least-kv-cache:1").expect("valid");
        assert_eq!(router.decide(load_heavy.as_ref(), &request, &pods).index, 0);
    }

    #[test]
    fn a_part_that_cannot_score_adds_nothing() {
        let (p0, _g0) = pod(0, 3);
        let (p1, _g1) = pod(1, 0);
        let pods = [p0, p1];
        let model = model();
        // No engine metrics: only least-request speaks.
        let request = RouteRequest::new(&model, b"{}");
        let router = router();
        let mix = router.strategy("least-request:1,least-kv-cache:5").expect("valid");
        for _ in 0..20 {
            assert_eq!(router.decide(mix.as_ref(), &request, &pods).index, 1);
        }
    }

    #[test]
    fn equal_scores_leave_the_choice_to_the_other_parts() {
        let (p0, _g0) = pod(0, 1);
        let (p1, _g1) = pod(1, 0);
        let pods = [p0, p1];
        let model = model();
        let same = || Some(fresh(|m| m.kv_cache_usage = Some(0.5)));
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![same(), same()]));
        let router = router();
        let mix = router.strategy("least-kv-cache:10,least-request:1").expect("valid");
        assert_eq!(router.decide(mix.as_ref(), &request, &pods).index, 1);
    }
}
