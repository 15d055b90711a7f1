//! Routing: choosing one ready pod for a request.
//!
//! Every strategy is one file implementing [`Strategy`] and one line in
//! [`Router::new`]. Strategies choose from state; they never forward.

mod least_request;
mod random;

use std::collections::HashMap;
use std::sync::Arc;

use crate::discovery::PodInfo;

/// Every strategy name of contract section 4, recognised whether or not this
/// build implements it, so that a typo (400 `incorrect routing strategy`) is
/// told apart from a strategy that is simply not available yet.
pub const KNOWN_STRATEGIES: &[&str] = &[
    "random",
    "least-request",
    "least-busy-time",
    "least-latency",
    "least-kv-cache",
    "least-gpu-cache",
    "least-utilization",
    "throughput",
    "power-of-two",
    "prefix-cache",
    "prefix-cache-preble",
    "vtc-basic",
    "session-affinity",
    "pd",
];

/// What a strategy may look at besides the pods.
#[derive(Debug, Default, Clone, Copy)]
pub struct RouteRequest<'a> {
    /// The request body, for strategies that hash the prompt.
    pub body: &'a [u8],
}

/// One routing strategy.
pub trait Strategy: Send + Sync {
    /// The name clients use in `routing-strategy`.
    fn name(&self) -> &'static str;

    /// Picks one of `candidates` (never empty, all ready) and returns its index.
    fn pick(&self, request: &RouteRequest<'_>, candidates: &[Arc<PodInfo>]) -> usize;
}

/// Why a strategy name cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub enum StrategyError {
    /// Not a strategy name at all.
    Unknown,
    /// A contract strategy this build does not implement yet.
    Unavailable,
}

/// The registry of implemented strategies.
pub struct Router {
    strategies: HashMap<&'static str, Arc<dyn Strategy>>,
}

impl Router {
    pub fn new() -> Self {
        let all: Vec<Arc<dyn Strategy>> = vec![Arc::new(random::Random), Arc::new(least_request::LeastRequest)];
        Self { strategies: all.into_iter().map(|s| (s.name(), s)).collect() }
    }

    /// Looks up a strategy by the name a client, profile or flag gave.
    pub fn strategy(&self, name: &str) -> Result<&Arc<dyn Strategy>, StrategyError> {
        if let Some(strategy) = self.strategies.get(name) {
            return Ok(strategy);
        }
        if KNOWN_STRATEGIES.contains(&name) || is_weighted_mix(name) {
            Err(StrategyError::Unavailable)
        } else {
            Err(StrategyError::Unknown)
        }
    }
}

impl Default for Router {
    fn default() -> Self {
        Self::new()
    }
}

/// `name:weight,name:weight` with known names and non-negative weights.
fn is_weighted_mix(spec: &str) -> bool {
    (spec.contains(',') || spec.contains(':')) && {
        spec.split(',').all(|part| {
            let (name, weight) = part.split_once(':').unwrap_or((part, "1"));
            KNOWN_STRATEGIES.contains(&name.trim()) && weight.trim().parse::<f64>().is_ok_and(|w| w >= 0.0)
        })
    }
}

/// Index of the pod with the fewest requests in flight; ties broken at random
/// so equal pods share the load instead of the first one taking it all.
pub(crate) fn least_in_flight(candidates: &[Arc<PodInfo>]) -> usize {
    let mut best = 0;
    let mut best_load = usize::MAX;
    let mut ties = 0u32;
    for (i, pod) in candidates.iter().enumerate() {
        let load = pod.load.in_flight();
        if load < best_load {
            best = i;
            best_load = load;
            ties = 1;
        } else if load == best_load {
            // Reservoir sampling over the tied pods: each keeps a 1/n chance.
            ties += 1;
            if rand::random_range(0..ties) == 0 {
                best = i;
            }
        }
    }
    best
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::discovery::{PodLoad, Role};
    use std::collections::BTreeMap;

    /// A ready pod named `p<i>` with `in_flight` requests running.
    pub fn pod(i: u16, in_flight: usize) -> (Arc<PodInfo>, Vec<crate::discovery::InFlightGuard>) {
        let load = Arc::new(PodLoad::default());
        let guards = (0..in_flight).map(|_| load.start()).collect();
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], 9000 + i).into();
        let info = PodInfo {
            key: format!("default/p{i}"),
            name: format!("p{i}"),
            namespace: "default".into(),
            model: "m".into(),
            addr: Some(addr),
            addr_text: addr.to_string(),
            metric_port: 9000 + i,
            engine: "vllm".into(),
            roleset: None,
            role: Role::Combined,
            labels: BTreeMap::new(),
            config_annotation: None,
            ready: true,
            load,
        };
        (Arc::new(info), guards)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_tells_unknown_from_unavailable() {
        let router = Router::new();
        assert_eq!(router.strategy("random").map(|s| s.name()).ok(), Some("random"));
        assert_eq!(router.strategy("least-request").map(|s| s.name()).ok(), Some("least-request"));
        assert_eq!(router.strategy("nope").err(), Some(StrategyError::Unknown));
        assert_eq!(router.strategy("Random").err(), Some(StrategyError::Unknown));
        assert_eq!(router.strategy("prefix-cache").err(), Some(StrategyError::Unavailable));
        assert_eq!(router.strategy("least-request:1,throughput:2").err(), Some(StrategyError::Unavailable));
        assert_eq!(router.strategy("least-request:1,bogus:2").err(), Some(StrategyError::Unknown));
        assert_eq!(router.strategy("least-request:x").err(), Some(StrategyError::Unknown));
    }
}
