//! `random`: uniform choice among ready pods.

use std::sync::Arc;

use super::{RouteRequest, Strategy};
use crate::discovery::PodInfo;

pub struct Random;

impl Strategy for Random {
    fn name(&self) -> &'static str {
        "random"
    }

    fn pick(&self, _request: &RouteRequest<'_>, candidates: &[Arc<PodInfo>]) -> usize {
        rand::random_range(0..candidates.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::test_support::pod;

    #[test]
    fn reaches_every_pod() {
        let pods: Vec<_> = (0..3).map(|i| pod(i, 0).0).collect();
        let mut seen = [0usize; 3];
        for _ in 0..300 {
            seen[Random.pick(&RouteRequest::default(), &pods)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 30), "uneven spread {seen:?}");
    }

    #[test]
    fn single_pod() {
        let pods = vec![pod(0, 5).0];
        assert_eq!(Random.pick(&RouteRequest::default(), &pods), 0);
    }
}
