//! `least-latency`: the pod where a new request is expected to finish
//! soonest.
//!
//! A request's service time on a pod is its recent mean time to first token
//! (vLLM counts queueing in it) plus the expected output length times its
//! recent mean time per output token, both from the engine's histograms over
//! the scrape window. The gateway's own observation then scales it by the
//! work on hand, `1 + max(in flight here, running + waiting at the engine)`,
//! as linkerd's peak-EWMA balancer does with its pending count: the
//! histograms lag, the in-flight count does not, so a burst spreads instead
//! of herding onto the pod that was fastest a moment ago.
//!
//! A pod that finished no request within the window has no means; it is
//! assumed to be as fast as the average of the pods that did, so idle pods
//! get traffic again. With no observation anywhere, every service time is
//! zero and the choice is least-request's.

use std::sync::Arc;

use super::{RouteRequest, Strategy, Unscored};
use crate::discovery::PodInfo;
use crate::engine_metrics::PodMetrics;

/// Output tokens assumed per request before any pod reported a mean.
const DEFAULT_OUTPUT_TOKENS: f64 = 100.0;

pub struct LeastLatency;

impl Strategy for LeastLatency {
    fn name(&self) -> &'static str {
        "least-latency"
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
        let metrics = candidates.iter().map(|pod| request.pod_metrics(pod)).collect::<Result<Vec<_>, _>>()?;
        let mean = |field: fn(&PodMetrics) -> Option<f64>| {
            let (sum, n) = metrics.iter().filter_map(|m| field(m)).fold((0.0, 0u32), |(s, n), v| (s + v, n + 1));
            (n > 0).then(|| sum / f64::from(n))
        };
        let ttft_mean = mean(|m| m.time_to_first_token).unwrap_or(0.0);
        let tpot_mean = mean(|m| m.time_per_output_token).unwrap_or(0.0);
        let output_tokens = mean(|m| m.generation_tokens_per_request).unwrap_or(DEFAULT_OUTPUT_TOKENS);
        scores.clear();
        for (pod, m) in candidates.iter().zip(&metrics) {
            let ttft = m.time_to_first_token.unwrap_or(ttft_mean);
            let tpot = m.time_per_output_token.unwrap_or(tpot_mean);
            let service = ttft + output_tokens * tpot;
            let engine_load = m.running.unwrap_or(0.0) + m.waiting.unwrap_or(0.0);
            let load = engine_load.max(pod.load.routing_load() as f64);
            scores.push(service * (1.0 + load));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::test_support::*;

    fn timing(ttft: f64, tpot: f64, running: f64) -> Option<PodMetrics> {
        Some(fresh(|m| {
            m.time_to_first_token = Some(ttft);
            m.time_per_output_token = Some(tpot);
            m.generation_tokens_per_request = Some(10.0);
            m.running = Some(running);
            m.waiting = Some(0.0);
        }))
    }

    #[test]
    fn picks_the_fastest_pod() {
        let pods = pods(3);
        let model = model();
        // Service: 0.5 + 10·0.1 = 1.5, 0.1 + 10·0.01 = 0.2, 0.05 + 10·0.05 = 0.55.
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![
            timing(0.5, 0.1, 0.0),
            timing(0.1, 0.01, 0.0),
            timing(0.05, 0.05, 0.0),
        ]));
        assert_eq!(LeastLatency.pick(&request, &pods), Ok(1));
    }

    #[test]
    fn work_on_hand_scales_the_service_time() {
        // Pod 0 is twice as fast but has three requests running at the engine;
        // pod 1 has none there but two in flight from this gateway.
        let (a, _ga) = pod(0, 0);
        let (b, _gb) = pod(1, 2);
        let model = model();
        let request =
            RouteRequest::new(&model, b"{}").with_metrics(view(vec![timing(0.1, 0.01, 3.0), timing(0.2, 0.02, 0.0)]));
        // Costs: 0.2·(1+3) = 0.8 against 0.4·(1+2) = 1.2.
        assert_eq!(LeastLatency.pick(&request, &[a, b]), Ok(0));
        let mut scores = Vec::new();
        let (c, _gc) = pod(0, 5);
        let (d, _gd) = pod(1, 2);
        LeastLatency.score(&request, &[c, d], &mut scores).expect("scores");
        assert!((scores[0] - 0.2 * 6.0).abs() < 1e-9, "in flight here beats the engine's count: {scores:?}");
    }

    #[test]
    fn a_pod_without_recent_requests_counts_as_average() {
        let pods = pods(3);
        let model = model();
        let idle = Some(fresh(|m| {
            m.running = Some(0.0);
            m.waiting = Some(0.0);
        }));
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![
            timing(0.2, 0.02, 1.0),
            idle,
            timing(0.4, 0.04, 1.0),
        ]));
        let mut scores = Vec::new();
        LeastLatency.score(&request, &pods, &mut scores).expect("scores");
        assert!((scores[1] - 0.6).abs() < 1e-9, "mean service 0.3 + 10·0.03: {scores:?}");
        assert_eq!(LeastLatency.pick(&request, &pods), Ok(1), "idle beats loaded");
    }

    #[test]
    fn no_observations_anywhere_is_least_request() {
        let (a, _ga) = pod(0, 3);
        let (b, _gb) = pod(1, 1);
        let model = model();
        let empty = || Some(fresh(|_| {}));
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![empty(), empty()]));
        assert_eq!(LeastLatency.pick(&request, &[a, b]), Ok(1));
    }

    #[test]
    fn missing_or_stale_metrics_are_not_guessed() {
        let pods = pods(2);
        let model = model();
        let missing = RouteRequest::new(&model, b"{}").with_metrics(view(vec![timing(0.1, 0.1, 0.0), None]));
        assert_eq!(LeastLatency.pick(&missing, &pods), Err(Unscored::MetricsMissing));
        let stale =
            RouteRequest::new(&model, b"{}").with_metrics(view(vec![Some(stale(|_| {})), timing(0.1, 0.1, 0.0)]));
        assert_eq!(LeastLatency.pick(&stale, &pods), Err(Unscored::MetricsStale));
    }

    #[test]
    fn single_pod() {
        let pods = pods(1);
        let model = model();
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![timing(9.0, 1.0, 100.0)]));
        assert_eq!(LeastLatency.pick(&request, &pods), Ok(0));
    }
}
