//! `least-request`: the pod with the fewest requests in flight through this
//! gateway, ties broken at random. The count is the gateway's own (taken when
//! a request is routed, released when its response ends), so it reacts to a
//! burst at once instead of waiting for the next engine metrics scrape.

use std::sync::Arc;

use super::{RouteRequest, Strategy, least_in_flight};
use crate::discovery::PodInfo;

pub struct LeastRequest;

impl Strategy for LeastRequest {
    fn name(&self) -> &'static str {
        "least-request"
    }

    fn pick(&self, _request: &RouteRequest<'_>, candidates: &[Arc<PodInfo>]) -> usize {
        least_in_flight(candidates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::test_support::pod;

    #[test]
    fn picks_least_loaded() {
        let (a, _ga) = pod(0, 3);
        let (b, _gb) = pod(1, 1);
        let (c, _gc) = pod(2, 2);
        assert_eq!(LeastRequest.pick(&RouteRequest::default(), &[a, b, c]), 1);
    }

    #[test]
    fn ties_are_shared() {
        let (a, _ga) = pod(0, 1);
        let (b, _gb) = pod(1, 1);
        let (c, _gc) = pod(2, 4);
        let pods = [a, b, c];
        let mut seen = [0usize; 3];
        for _ in 0..400 {
            seen[LeastRequest.pick(&RouteRequest::default(), &pods)] += 1;
        }
        assert_eq!(seen[2], 0);
        assert!(seen[0] > 100 && seen[1] > 100, "ties not shared: {seen:?}");
    }

    #[test]
    fn follows_load_as_it_changes() {
        let (a, _ga) = pod(0, 0);
        let (b, _gb) = pod(1, 0);
        let pods = [a, b];
        // Route four requests holding each one open: they alternate.
        let mut guards = Vec::new();
        let mut counts = [0; 2];
        for _ in 0..4 {
            let i = LeastRequest.pick(&RouteRequest::default(), &pods);
            counts[i] += 1;
            guards.push(pods[i].load.start());
        }
        assert_eq!(counts, [2, 2]);
    }
}
