//! `throughput`: the pod with the lowest recent token throughput load,
//! prompt tokens per second plus twice the generated tokens per second
//! (generation is the dearer phase), from the growth of
//! `vllm:prompt_tokens_total` and `vllm:generation_tokens_total` over the
//! window. AIBrix reads these through PromQL only and otherwise picks at
//! random. Loads are compared in steps of a tenth of the busiest candidate's
//! (see [`super::coarsen`]), near-equal pods going to fewer in flight.

use std::sync::Arc;

use super::{RouteRequest, Strategy, Unscored, coarsen, score_by_metrics};
use crate::discovery::PodInfo;

/// Weight of a generated token against a prompt token.
const GENERATION_WEIGHT: f64 = 2.0;
/// Share of the busiest candidate's load below which differences are equal.
const RELATIVE_STEP: f64 = 0.1;

pub struct Throughput;

impl Strategy for Throughput {
    fn name(&self) -> &'static str {
        "throughput"
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
        score_by_metrics(request, candidates, scores, |m, _| {
            Some(m.prompt_tokens_per_second? + GENERATION_WEIGHT * m.generation_tokens_per_second?)
        })?;
        // At least one token per second, so idle pods are not told apart by noise.
        let step = (scores.iter().copied().fold(0.0, f64::max) * RELATIVE_STEP).max(1.0);
        coarsen(scores, step);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::test_support::*;

    fn rate(prompt: f64, generation: f64) -> Option<crate::engine_metrics::PodMetrics> {
        Some(fresh(|m| {
            m.prompt_tokens_per_second = Some(prompt);
            m.generation_tokens_per_second = Some(generation);
        }))
    }

    #[test]
    fn generation_counts_double() {
        let pods = pods(3);
        let model = model();
        // Loads: 100 + 2·50 = 200, 300 + 0 = 300, 20 + 2·30 = 80.
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![
            rate(100.0, 50.0),
            rate(300.0, 0.0),
            rate(20.0, 30.0),
        ]));
        assert_eq!(Throughput.pick(&request, &pods), Ok(2));
    }

    #[test]
    fn idle_pods_tie_and_go_to_fewer_in_flight() {
        let (a, _ga) = pod(0, 1);
        let (b, _gb) = pod(1, 0);
        let model = model();
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![rate(0.0, 0.0), rate(0.0, 0.0)]));
        assert_eq!(Throughput.pick(&request, &[a, b]), Ok(1));
    }

    #[test]
    fn loads_within_a_tenth_of_the_busiest_tie() {
        let (a, _ga) = pod(0, 2);
        let (b, _gb) = pod(1, 0);
        let model = model();
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![rate(1000.0, 0.0), rate(1050.0, 0.0)]));
        assert_eq!(Throughput.pick(&request, &[a, b]), Ok(1));
    }

    #[test]
    fn missing_or_stale_metrics_are_not_guessed() {
        let pods = pods(2);
        let model = model();
        let missing = RouteRequest::new(&model, b"{}")
            .with_metrics(view(vec![rate(1.0, 1.0), Some(fresh(|m| m.prompt_tokens_per_second = Some(0.0)))]));
        assert_eq!(Throughput.pick(&missing, &pods), Err(Unscored::MetricsMissing));
        let stale = RouteRequest::new(&model, b"{}").with_metrics(view(vec![
            rate(1.0, 1.0),
            Some(stale(|m| {
                m.prompt_tokens_per_second = Some(0.0);
                m.generation_tokens_per_second = Some(0.0);
            })),
        ]));
        assert_eq!(Throughput.pick(&stale, &pods), Err(Unscored::MetricsStale));
    }

    #[test]
    fn single_pod() {
        let pods = pods(1);
        let model = model();
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![rate(1e6, 1e6)]));
        assert_eq!(Throughput.pick(&request, &pods), Ok(0));
    }
}
