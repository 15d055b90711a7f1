//! `least-request`: the pod with the fewest requests in flight, ties broken
//! at random. The count is the fleet's as this replica sees it
//! ([`PodLoad::routing_load`](crate::discovery::PodLoad::routing_load)): its
//! own requests (taken when routed, released when the response ends, so a
//! burst spreads at once), plus the other replicas' as they said through
//! Redis, or the engine's count at its last scrape moved by this replica's
//! own starts since. It is also what every other strategy falls back to.

use std::sync::Arc;

use super::{RouteRequest, Strategy, Unscored, least_in_flight};
use crate::discovery::PodInfo;

pub struct LeastRequest;

impl Strategy for LeastRequest {
    fn name(&self) -> &'static str {
        "least-request"
    }

    fn samples_large_fleets(&self) -> bool {
        true
    }

    fn score(&self, _: &RouteRequest<'_>, candidates: &[Arc<PodInfo>], scores: &mut Vec<f64>) -> Result<(), Unscored> {
        scores.clear();
        let now = crate::discovery::LoadClock::now();
        scores.extend(candidates.iter().map(|pod| pod.load.routing_load_at(now) as f64));
        Ok(())
    }

    fn pick(&self, _request: &RouteRequest<'_>, candidates: &[Arc<PodInfo>]) -> Result<usize, Unscored> {
        Ok(least_in_flight(candidates))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::test_support::*;

    #[test]
    fn picks_least_loaded() {
        let (a, _ga) = pod(0, 3);
        let (b, _gb) = pod(1, 1);
        let (c, _gc) = pod(2, 2);
        let model = model();
        assert_eq!(LeastRequest.pick(&RouteRequest::new(&model, b"{}"), &[a, b, c]), Ok(1));
    }

    #[test]
    fn ties_are_shared() {
        let (a, _ga) = pod(0, 1);
        let (b, _gb) = pod(1, 1);
        let (c, _gc) = pod(2, 4);
        let pods = [a, b, c];
        let model = model();
        let request = RouteRequest::new(&model, b"{}");
        let seen = spread(3, 400, || LeastRequest.pick(&request, &pods).expect("picks"));
        assert_eq!(seen[2], 0);
        assert!(seen[0] > 100 && seen[1] > 100, "ties not shared: {seen:?}");
    }

    #[test]
    fn follows_load_as_it_changes() {
        let pods = pods(2);
        let model = model();
        let request = RouteRequest::new(&model, b"{}");
        // Route four requests holding each one open: they alternate.
        let mut guards = Vec::new();
        let mut counts = [0; 2];
        for _ in 0..4 {
            let i = LeastRequest.pick(&request, &pods).expect("picks");
            counts[i] += 1;
            guards.push(pods[i].load.start());
        }
        assert_eq!(counts, [2, 2]);
    }

    #[test]
    fn single_pod() {
        let (only, _g) = pod(0, 9);
        let model = model();
        assert_eq!(LeastRequest.pick(&RouteRequest::new(&model, b"{}"), &[only]), Ok(0));
    }

    #[test]
    fn scores_are_in_flight_counts() {
        let (a, _ga) = pod(0, 2);
        let (b, _gb) = pod(1, 0);
        let model = model();
        let mut scores = Vec::new();
        LeastRequest.score(&RouteRequest::new(&model, b"{}"), &[a, b], &mut scores).expect("scores");
        assert_eq!(scores, [2.0, 0.0]);
    }
}
