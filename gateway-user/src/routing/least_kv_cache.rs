//! `least-kv-cache`: the pod whose engine reports the least KV cache in use
//! (`vllm:kv_cache_usage_perc`, or `vllm:gpu_cache_usage_perc` on older
//! engines; `sglang:token_usage`). AIBrix adds a CPU cache series vLLM v1
//! does not export and so always fell back to random; this reads what the
//! engine has. Usage is compared in steps of 2% (see [`super::coarsen`]);
//! equal usage (idle pods all read 0) goes to fewer in flight.

use std::sync::Arc;

use super::{RouteRequest, Strategy, Unscored, coarsen, score_by_metrics};

/// Cache usage differences below this are treated as equal.
pub(super) const USAGE_STEP: f64 = 0.02;
use crate::discovery::PodInfo;

pub struct LeastKvCache;

impl Strategy for LeastKvCache {
    fn name(&self) -> &'static str {
        "least-kv-cache"
    }

    fn samples_large_fleets(&self) -> bool {
        true
    }

    fn score(
        &self,
        request: &RouteRequest<'_>,
        candidates: &[Arc<PodInfo>],
        scores: &mut Vec<f64>,
    ) -> Result<(), Unscored> {
        score_by_metrics(request, candidates, scores, |m, _| m.kv_cache_usage)?;
        coarsen(scores, USAGE_STEP);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::test_support::*;

    fn kv(usage: f64) -> Option<crate::engine_metrics::PodMetrics> {
        Some(fresh(|m| m.kv_cache_usage = Some(usage)))
    }

    #[test]
    fn picks_the_emptiest_cache() {
        let pods = pods(3);
        let model = model();
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![kv(0.7), kv(0.2), kv(0.4)]));
        assert_eq!(LeastKvCache.pick(&request, &pods), Ok(1));
    }

    #[test]
    fn ties_go_to_fewer_in_flight() {
        let (a, _ga) = pod(0, 2);
        let (b, _gb) = pod(1, 0);
        let model = model();
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![kv(0.0), kv(0.0)]));
        assert_eq!(LeastKvCache.pick(&request, &[a, b]), Ok(1));
    }

    #[test]
    fn near_equal_usage_is_a_tie() {
        let (a, _ga) = pod(0, 3);
        let (b, _gb) = pod(1, 1);
        let model = model();
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![kv(0.401), kv(0.415)]));
        assert_eq!(LeastKvCache.pick(&request, &[a, b]), Ok(1), "within 2%: fewer in flight wins");
    }

    #[test]
    fn missing_or_stale_metrics_are_not_guessed() {
        let pods = pods(2);
        let model = model();
        let missing = RouteRequest::new(&model, b"{}").with_metrics(view(vec![kv(0.1), None]));
        assert_eq!(LeastKvCache.pick(&missing, &pods), Err(Unscored::MetricsMissing));
        let no_series = RouteRequest::new(&model, b"{}").with_metrics(view(vec![kv(0.1), Some(fresh(|_| {}))]));
        assert_eq!(LeastKvCache.pick(&no_series, &pods), Err(Unscored::MetricsMissing));
        let stale = RouteRequest::new(&model, b"{}")
            .with_metrics(view(vec![kv(0.1), Some(stale(|m| m.kv_cache_usage = Some(0.0)))]));
        assert_eq!(LeastKvCache.pick(&stale, &pods), Err(Unscored::MetricsStale));
    }

    #[test]
    fn single_pod() {
        let pods = pods(1);
        let model = model();
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![kv(1.0)]));
        assert_eq!(LeastKvCache.pick(&request, &pods), Ok(0));
    }
}
