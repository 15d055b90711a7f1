//! `least-busy-time`: the pod whose engine spent the smallest share of the
//! recent window with requests running, read from `vllm:num_requests_running`
//! at every scrape. (AIBrix reads a `gpu_busy_time_ratio` series no engine
//! exports and so always picks at random.) Shares are compared in steps of
//! 10% (see [`super::coarsen`]); pods equally busy, such as several busy all
//! the time, go to fewer in flight.

use std::sync::Arc;

use super::{RouteRequest, Strategy, Unscored, coarsen, score_by_metrics};

/// Busy-share differences below this are treated as equal.
const SHARE_STEP: f64 = 0.1;
use crate::discovery::PodInfo;

pub struct LeastBusyTime;

impl Strategy for LeastBusyTime {
    fn name(&self) -> &'static str {
        "least-busy-time"
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
        score_by_metrics(request, candidates, scores, |m, _| m.busy_fraction)?;
        coarsen(scores, SHARE_STEP);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::test_support::*;

    fn busy(share: f64) -> Option<crate::engine_metrics::PodMetrics> {
        Some(fresh(|m| m.busy_fraction = Some(share)))
    }

    #[test]
    fn picks_the_least_busy() {
        let pods = pods(3);
        let model = model();
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![busy(1.0), busy(0.25), busy(0.5)]));
        assert_eq!(LeastBusyTime.pick(&request, &pods), Ok(1));
    }

    #[test]
    fn all_busy_goes_to_fewer_in_flight() {
        let (a, _ga) = pod(0, 5);
        let (b, _gb) = pod(1, 2);
        let (c, _gc) = pod(2, 9);
        let model = model();
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![busy(1.0), busy(1.0), busy(1.0)]));
        assert_eq!(LeastBusyTime.pick(&request, &[a, b, c]), Ok(1));
    }

    #[test]
    fn near_equal_shares_are_a_tie() {
        let (a, _ga) = pod(0, 4);
        let (b, _gb) = pod(1, 0);
        let model = model();
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![busy(0.61), busy(0.68)]));
        assert_eq!(LeastBusyTime.pick(&request, &[a, b]), Ok(1));
    }

    #[test]
    fn missing_or_stale_metrics_are_not_guessed() {
        let pods = pods(2);
        let model = model();
        let missing = RouteRequest::new(&model, b"{}").with_metrics(view(vec![busy(0.0)]));
        assert_eq!(LeastBusyTime.pick(&missing, &pods), Err(Unscored::MetricsMissing));
        let stale = RouteRequest::new(&model, b"{}")
            .with_metrics(view(vec![Some(stale(|m| m.busy_fraction = Some(0.0))), busy(0.5)]));
        assert_eq!(LeastBusyTime.pick(&stale, &pods), Err(Unscored::MetricsStale));
    }

    #[test]
    fn single_pod() {
        let pods = pods(1);
        let model = model();
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![busy(1.0)]));
        assert_eq!(LeastBusyTime.pick(&request, &pods), Ok(0));
    }
}
