//! `least-gpu-cache`: the pod whose engine reports the least GPU KV cache
//! in use (`vllm:gpu_cache_usage_perc`; vLLM v1 renamed it
//! `vllm:kv_cache_usage_perc`, which stands in; `sglang:token_usage`),
//! compared in steps of 2% like `least-kv-cache`.

use std::sync::Arc;

use super::least_kv_cache::USAGE_STEP;
use super::{RouteRequest, Strategy, Unscored, coarsen, score_by_metrics};
use crate::discovery::PodInfo;

pub struct LeastGpuCache;

impl Strategy for LeastGpuCache {
    fn name(&self) -> &'static str {
        "least-gpu-cache"
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
        score_by_metrics(request, candidates, scores, |m, _| m.gpu_cache_usage)?;
        coarsen(scores, USAGE_STEP);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::test_support::*;

    fn gpu(usage: f64) -> Option<crate::engine_metrics::PodMetrics> {
        Some(fresh(|m| m.gpu_cache_usage = Some(usage)))
    }

    #[test]
    fn picks_the_emptiest_cache() {
        let pods = pods(3);
        let model = model();
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![gpu(0.3), gpu(0.5), gpu(0.05)]));
        assert_eq!(LeastGpuCache.pick(&request, &pods), Ok(2));
    }

    #[test]
    fn ties_go_to_fewer_in_flight() {
        let (a, _ga) = pod(0, 1);
        let (b, _gb) = pod(1, 3);
        let model = model();
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![gpu(0.2), gpu(0.2)]));
        assert_eq!(LeastGpuCache.pick(&request, &[a, b]), Ok(0));
    }

    #[test]
    fn missing_or_stale_metrics_are_not_guessed() {
        let pods = pods(2);
        let model = model();
        let missing = RouteRequest::new(&model, b"{}").with_metrics(view(vec![None, gpu(0.1)]));
        assert_eq!(LeastGpuCache.pick(&missing, &pods), Err(Unscored::MetricsMissing));
        let stale = RouteRequest::new(&model, b"{}")
            .with_metrics(view(vec![gpu(0.1), Some(stale(|m| m.gpu_cache_usage = Some(0.0)))]));
        assert_eq!(LeastGpuCache.pick(&stale, &pods), Err(Unscored::MetricsStale));
    }

    #[test]
    fn single_pod() {
        let pods = pods(1);
        let model = model();
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![gpu(0.9)]));
        assert_eq!(LeastGpuCache.pick(&request, &pods), Ok(0));
    }
}
