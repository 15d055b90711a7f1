//! `power-of-two`: two distinct candidates drawn at random, the one with
//! fewer requests in flight wins (the "power of two choices": nearly as even
//! as least-request, without every gateway herding onto the same least
//! loaded pod). The counts are the fleet's as least-request sees them: with
//! Redis, every replica's requests in flight, as AIBrix keeps them there. It
//! has no scores, so it cannot be part of a weighted mix.

use std::sync::Arc;

use super::ties::Lowest;
use super::{RouteRequest, Strategy, Unscored};
use crate::discovery::PodInfo;

pub struct PowerOfTwo;

impl Strategy for PowerOfTwo {
    fn name(&self) -> &'static str {
        "power-of-two"
    }

    fn score(&self, _: &RouteRequest<'_>, _: &[Arc<PodInfo>], _: &mut Vec<f64>) -> Result<(), Unscored> {
        Err(Unscored::NotScorable)
    }

    fn pick(&self, _request: &RouteRequest<'_>, candidates: &[Arc<PodInfo>]) -> Result<usize, Unscored> {
        let n = candidates.len();
        if n < 2 {
            return Ok(0);
        }
        let first = rand::random_range(0..n);
        // A second index distinct from the first, uniformly.
        let second = (first + 1 + rand::random_range(0..n - 1)) % n;
        let mut less_loaded = Lowest::new();
        for i in [first, second] {
            less_loaded.offer(candidates[i].load.routing_load(), i);
        }
        Ok(less_loaded.into_item().unwrap_or(first))
    }

    fn mixable(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::test_support::*;

    #[test]
    fn of_two_pods_the_less_loaded_always_wins() {
        let (a, _ga) = pod(0, 4);
        let (b, _gb) = pod(1, 1);
        let pods = [a, b];
        let model = model();
        let request = RouteRequest::new(&model, b"{}");
        assert_eq!(spread(2, 100, || PowerOfTwo.pick(&request, &pods).expect("picks")), [0, 100]);
    }

    #[test]
    fn the_most_loaded_of_many_is_never_chosen() {
        let mut guards = Vec::new();
        let pods: Vec<_> = (0..4)
            .map(|i| {
                let (p, g) = pod(i, if i == 3 { 10 } else { 0 });
                guards.push(g);
                p
            })
            .collect();
        let model = model();
        let request = RouteRequest::new(&model, b"{}");
        let seen = spread(4, 600, || PowerOfTwo.pick(&request, &pods).expect("picks"));
        assert_eq!(seen[3], 0, "{seen:?}");
        assert!(seen[..3].iter().all(|&n| n > 100), "ties are shared: {seen:?}");
    }

    #[test]
    fn single_pod() {
        let (only, _g) = pod(0, 7);
        let model = model();
        assert_eq!(PowerOfTwo.pick(&RouteRequest::new(&model, b"{}"), &[only]), Ok(0));
    }
}
