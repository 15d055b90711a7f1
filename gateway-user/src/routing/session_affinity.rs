//! `session-affinity`: keep a session on one pod.
//!
//! `x-session-id` is base64 of the pod's `IP:port`; while that pod is a
//! candidate, the request goes there. Otherwise `x-aibrix-session-key` (at
//! most 256 bytes) picks a pod by rendezvous hashing, FNV-1a 64 over the
//! key, a zero byte and each pod's `IP:port`, the highest hash winning (ties
//! to the smaller address), so a key moves only when its pod goes. Without
//! either the router falls back to least-request. Every answer carries
//! `x-session-id` for the pod that served it, so a client can stay there.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::header::HeaderValue;

use super::{RouteDecision, RouteRequest, Strategy, Unscored, headers};
use crate::discovery::PodInfo;

/// Longest `x-aibrix-session-key` honoured.
const MAX_SESSION_KEY_BYTES: usize = 256;

pub struct SessionAffinity;

impl SessionAffinity {
    /// The candidate a request is pinned to, if any.
    fn target(request: &RouteRequest<'_>, candidates: &[Arc<PodInfo>]) -> Option<usize> {
        let pinned = request
            .session_id
            .and_then(|id| STANDARD.decode(id).ok())
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .and_then(|addr| candidates.iter().position(|p| p.addr_text == addr));
        if pinned.is_some() {
            return pinned;
        }
        let key = request.session_key.filter(|k| k.len() <= MAX_SESSION_KEY_BYTES)?;
        candidates
            .iter()
            .enumerate()
            .max_by(|(_, a), (_, b)| {
                rendezvous(key, &a.addr_text)
                    .cmp(&rendezvous(key, &b.addr_text))
                    .then_with(|| b.addr_text.cmp(&a.addr_text))
            })
            .map(|(i, _)| i)
    }
}

/// FNV-1a 64 of `key`, a zero byte, then `addr`.
fn rendezvous(key: &str, addr: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    key.as_bytes()
        .iter()
        .chain(std::iter::once(&0u8))
        .chain(addr.as_bytes())
        .fold(OFFSET, |hash, &byte| (hash ^ u64::from(byte)).wrapping_mul(PRIME))
}

impl Strategy for SessionAffinity {
    fn name(&self) -> &'static str {
        "session-affinity"
    }

    fn score(
        &self,
        request: &RouteRequest<'_>,
        candidates: &[Arc<PodInfo>],
        scores: &mut Vec<f64>,
    ) -> Result<(), Unscored> {
        let target = Self::target(request, candidates).ok_or(Unscored::NoSession)?;
        scores.clear();
        scores.extend((0..candidates.len()).map(|i| if i == target { 0.0 } else { 1.0 }));
        Ok(())
    }

    fn chosen(&self, _request: &RouteRequest<'_>, pod: &PodInfo, decision: &mut RouteDecision) {
        if let Ok(value) = HeaderValue::from_str(&STANDARD.encode(&pod.addr_text)) {
            decision.headers.retain(|(name, _)| name != headers::SESSION_ID);
            decision.headers.push((headers::SESSION_ID, value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::test_support::*;

    fn id_of(pod: &PodInfo) -> String {
        STANDARD.encode(&pod.addr_text)
    }

    #[test]
    fn session_id_pins_to_its_pod() {
        let pods = pods(3);
        let model = model();
        let id = id_of(&pods[2]);
        let mut request = RouteRequest::new(&model, b"{}");
        request.session_id = Some(&id);
        for _ in 0..20 {
            assert_eq!(SessionAffinity.pick(&request, &pods), Ok(2));
        }
    }

    #[test]
    fn session_id_of_a_gone_pod_or_garbage_is_no_pin() {
        let pods = pods(2);
        let model = model();
        let gone = STANDARD.encode("10.9.9.9:8000");
        let mut request = RouteRequest::new(&model, b"{}");
        request.session_id = Some(&gone);
        assert_eq!(SessionAffinity.pick(&request, &pods), Err(Unscored::NoSession));
        request.session_id = Some("%%% not base64");
        assert_eq!(SessionAffinity.pick(&request, &pods), Err(Unscored::NoSession));
        request.session_id = None;
        assert_eq!(SessionAffinity.pick(&request, &pods), Err(Unscored::NoSession));
    }

    #[test]
    fn session_key_is_stable_spread_and_moves_only_when_its_pod_goes() {
        let pods = pods(4);
        let model = model();
        let mut chosen = Vec::new();
        for k in 0..200 {
            let key = format!("session-{k}");
            let mut request = RouteRequest::new(&model, b"{}");
            request.session_key = Some(&key);
            let first = SessionAffinity.pick(&request, &pods).expect("pinned");
            assert_eq!(SessionAffinity.pick(&request, &pods), Ok(first), "stable");
            // Remove a pod that is not this key's: the key stays on its pod.
            let other = (first + 1) % 4;
            let rest: Vec<_> =
                pods.iter().enumerate().filter(|(i, _)| *i != other).map(|(_, p)| Arc::clone(p)).collect();
            let again = SessionAffinity.pick(&request, &rest).expect("pinned");
            assert_eq!(rest[again].key, pods[first].key);
            chosen.push(first);
        }
        for pod in 0..4 {
            let n = chosen.iter().filter(|&&c| c == pod).count();
            assert!(n > 20, "pod {pod} got {n} of 200 keys");
        }
    }

    #[test]
    fn session_id_wins_over_the_key_and_long_keys_are_ignored() {
        let pods = pods(3);
        let model = model();
        let id = id_of(&pods[0]);
        let long = "k".repeat(MAX_SESSION_KEY_BYTES + 1);
        let mut request = RouteRequest::new(&model, b"{}");
        request.session_id = Some(&id);
        request.session_key = Some(&long);
        assert_eq!(SessionAffinity.pick(&request, &pods), Ok(0));
        request.session_id = None;
        assert_eq!(SessionAffinity.pick(&request, &pods), Err(Unscored::NoSession));
    }

    #[test]
    fn rendezvous_is_fnv1a_over_key_zero_and_address() {
        // FNV-1a 64 of the empty input is the offset basis; of one zero byte:
        assert_eq!(rendezvous("", ""), 0xaf63_bd4c_8601_b7df);
    }

    #[test]
    fn the_answer_names_the_pod_even_after_a_fallback() {
        let router = router();
        let pods = pods(2);
        let model = model();
        let request = RouteRequest::new(&model, b"{}");
        let strategy = router.strategy("session-affinity").expect("registered");
        let decision = router.decide(strategy.as_ref(), &request, &pods);
        let expected = id_of(&pods[decision.index]);
        assert_eq!(decision.headers, [(headers::SESSION_ID, HeaderValue::from_str(&expected).expect("ascii"))]);
    }

    #[test]
    fn single_pod() {
        let pods = pods(1);
        let model = model();
        let mut request = RouteRequest::new(&model, b"{}");
        request.session_key = Some("k");
        assert_eq!(SessionAffinity.pick(&request, &pods), Ok(0));
    }
}
