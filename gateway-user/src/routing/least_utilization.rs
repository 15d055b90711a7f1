//! `least-utilization`: the pod whose engine has the least work on hand,
//! requests running plus requests waiting (`vllm:num_requests_running` +
//! `vllm:num_requests_waiting`). Unlike least-request this counts every
//! client of the engine, not only this gateway's; and since the scrape lags,
//! a pod counts at least the requests this gateway has in flight to it, so
//! a burst between two scrapes spreads instead of piling onto the pod that
//! read lowest. AIBrix reads a series only one engine (xllm) exports and
//! otherwise picks at random.

use std::sync::Arc;

use super::{RouteRequest, Strategy, Unscored, score_by_metrics};
use crate::discovery::PodInfo;

pub struct LeastUtilization;

impl Strategy for LeastUtilization {
    fn name(&self) -> &'static str {
        "least-utilization"
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
        score_by_metrics(request, candidates, scores, |m, pod| {
            Some((m.running? + m.waiting?).max(pod.load.routing_load() as f64))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::test_support::*;

    fn load(running: f64, waiting: f64) -> Option<crate::engine_metrics::PodMetrics> {
        Some(fresh(|m| {
            m.running = Some(running);
            m.waiting = Some(waiting);
        }))
    }

    #[test]
    fn counts_waiting_as_well_as_running() {
        let pods = pods(3);
        let model = model();
        let request =
            RouteRequest::new(&model, b"{}").with_metrics(view(vec![load(4.0, 0.0), load(1.0, 5.0), load(2.0, 1.0)]));
        assert_eq!(LeastUtilization.pick(&request, &pods), Ok(2));
    }

    #[test]
    fn ties_go_to_fewer_in_flight() {
        let (a, _ga) = pod(0, 2);
        let (b, _gb) = pod(1, 1);
        let model = model();
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![load(1.0, 1.0), load(2.0, 0.0)]));
        assert_eq!(LeastUtilization.pick(&request, &[a, b]), Ok(1));
    }

    #[test]
    fn requests_in_flight_count_before_the_engine_reports_them() {
        let (a, _ga) = pod(0, 5);
        let (b, _gb) = pod(1, 0);
        let model = model();
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![load(0.0, 0.0), load(2.0, 1.0)]));
        assert_eq!(LeastUtilization.pick(&request, &[a, b]), Ok(1), "5 just sent beat 3 reported");
    }

    #[test]
    fn missing_or_stale_metrics_are_not_guessed() {
        let pods = pods(2);
        let model = model();
        let no_waiting = RouteRequest::new(&model, b"{}")
            .with_metrics(view(vec![load(0.0, 0.0), Some(fresh(|m| m.running = Some(0.0)))]));
        assert_eq!(LeastUtilization.pick(&no_waiting, &pods), Err(Unscored::MetricsMissing));
        let stale = RouteRequest::new(&model, b"{}").with_metrics(view(vec![
            Some(stale(|m| {
                m.running = Some(0.0);
                m.waiting = Some(0.0);
            })),
            load(0.0, 0.0),
        ]));
        assert_eq!(LeastUtilization.pick(&stale, &pods), Err(Unscored::MetricsStale));
    }

    #[test]
    fn single_pod() {
        let pods = pods(1);
        let model = model();
        let request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![load(50.0, 50.0)]));
        assert_eq!(LeastUtilization.pick(&request, &pods), Ok(0));
    }
}
