//! `random`: uniform choice among ready pods. It has no scores, so it
//! cannot be part of a weighted mix.

use std::sync::Arc;

use super::{RouteRequest, Strategy, Unscored};
use crate::discovery::PodInfo;

pub struct Random;

impl Strategy for Random {
    fn name(&self) -> &'static str {
        "random"
    }

    fn score(&self, _: &RouteRequest<'_>, _: &[Arc<PodInfo>], _: &mut Vec<f64>) -> Result<(), Unscored> {
        Err(Unscored::NotScorable)
    }

    fn pick(&self, _request: &RouteRequest<'_>, candidates: &[Arc<PodInfo>]) -> Result<usize, Unscored> {
        Ok(rand::random_range(0..candidates.len().max(1)))
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
    fn reaches_every_pod() {
        let pods = pods(3);
        let model = model();
        let request = RouteRequest::new(&model, b"{}");
        let seen = spread(3, 300, || Random.pick(&request, &pods).expect("always picks"));
        assert!(seen.iter().all(|&n| n > 30), "uneven spread {seen:?}");
    }

    #[test]
    fn single_pod() {
        let (only, _g) = pod(0, 5);
        let model = model();
        assert_eq!(Random.pick(&RouteRequest::new(&model, b"{}"), &[only]), Ok(0));
    }
}
