//! Sleeping engines (vLLM's sleep mode). A pod whose engine says it sleeps
//! (`vllm:engine_sleep_state`) gets no requests: routing skips it. When every
//! candidate pod of a model sleeps (for `pd`: every pod of a role) the
//! request gets 503; with `--wake-sleeping-models` one of them is asked to
//! wake up (`POST /wake_up`) first, and the 503 says to retry
//! (`Retry-After`).
//!
//! One call per model (and `pd` role) at a time, however many requests
//! arrive: after it is sent no other goes out until it has answered and
//! the pod has had a few scrapes to show it awake, or, after a failure, for
//! a few seconds. The pod asked is the sleeping one with the lowest key, so
//! replicas that wake a model at once ask the same pod. Nothing is kept
//! past its deadline, and requests that find an awake pod never look here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::discovery::PodInfo;
use crate::metrics::Metrics;

/// How long a pod has to answer its wake-up call (AIBrix's wait).
const WAKE_TIMEOUT: Duration = Duration::from_secs(120);
/// After a call succeeded: time for the pod's scrapes to show it awake
/// before it may be asked again.
const SETTLE: Duration = Duration::from_secs(10);
/// After a failed call, how long before another may be made.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// A call under way or just made: until when no other goes out, and which
/// call set that (a late answer must not move a newer call's deadline).
#[derive(Clone, Copy)]
struct Asked {
    until: Instant,
    call: u64,
}

/// Asks sleeping models' pods to wake up, once per model (and role) at a time.
pub struct Waker {
    enabled: bool,
    client: Client<HttpConnector, Empty<Bytes>>,
    /// Per model (and `pd` role): the latest call.
    asked: Arc<Mutex<HashMap<String, Asked>>>,
    calls: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Waker {
    /// `enabled`: `--wake-sleeping-models`.
    pub fn new(enabled: bool, metrics: Arc<Metrics>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        Self {
            enabled,
            client: Client::builder(TokioExecutor::new()).build(connector),
            asked: Arc::default(),
            calls: AtomicU64::new(0),
            metrics,
        }
    }

    /// Every candidate of `model` in `group` (a `pd` role, or all) sleeps:
    /// asks one of `sleeping` to wake up unless a call is under way or just
    /// made. Whether the model is being woken (the client may retry shortly).
    pub fn wake(&self, model: &Arc<str>, group: &str, sleeping: &[Arc<PodInfo>]) -> bool {
        if !self.enabled {
            return false;
        }
        // The same pod whichever replica asks: the lowest key with an address.
        let Some(pod) = sleeping.iter().filter(|p| p.addr.is_some()).min_by(|a, b| a.key.cmp(&b.key)).cloned() else {
            return false;
        };
        let Some(addr) = pod.addr else { return false };
        let now = Instant::now();
        let key = format!("{model}\0{group}");
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        {
            let mut asked = self.asked.lock().unwrap_or_else(PoisonError::into_inner);
            if asked.get(&key).is_some_and(|a| a.until > now) {
                return true;
            }
            asked.retain(|_, a| a.until > now);
            asked.insert(key.clone(), Asked { until: now + WAKE_TIMEOUT, call });
        }
        let (client, metrics, model) = (self.client.clone(), Arc::clone(&self.metrics), Arc::clone(model));
        let request = http::Request::post(format!("http://{addr}/wake_up")).body(Empty::new());
        let asked = Arc::clone(&self.asked);
        tokio::spawn(async move {
            let outcome = match request {
                Ok(request) => match tokio::time::timeout(WAKE_TIMEOUT, client.request(request)).await {
                    Ok(Ok(response)) if response.status().is_success() => Ok(()),
                    Ok(Ok(response)) => Err(format!("status {}", response.status().as_u16())),
                    Ok(Err(err)) => Err(err.to_string()),
                    Err(_) => Err(format!("no answer within {} s", WAKE_TIMEOUT.as_secs())),
                },
                Err(err) => Err(err.to_string()),
            };
            let next = match &outcome {
                Ok(()) => {
                    metrics.model_wakeup(&model, "woken");
                    tracing::info!(model = &*model, pod = %pod.name, "woke a sleeping model's pod");
                    SETTLE
                }
                Err(error) => {
                    metrics.model_wakeup(&model, "failed");
                    tracing::warn!(model = &*model, pod = %pod.name, error, "waking a sleeping model's pod failed");
                    RETRY_AFTER_FAILURE
                }
            };
            let mut asked = asked.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = asked.get_mut(&key).filter(|a| a.call == call) {
                entry.until = Instant::now() + next;
            }
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::test_support::pod;

    #[tokio::test]
    async fn one_call_per_model_at_a_time_and_again_after_a_failure() {
        let metrics = Arc::new(Metrics::new());
        let waker = Waker::new(true, Arc::clone(&metrics));
        let model: Arc<str> = Arc::from("m");
        // Port 1: nothing listens there, so the call fails at once.
        let mut closed = (*pod(0, 0).0).clone();
        closed.addr = Some(([127, 0, 0, 1], 1).into());
        let pods = vec![Arc::new(closed)];
        let failed = r#"aibrix_gateway_model_wakeups_total{model="m",outcome="failed"} 1"#;
        assert!(waker.wake(&model, "", &pods), "a wake-up is under way");
        for _ in 0..20 {
            assert!(waker.wake(&model, "", &pods), "still under way, not asked again");
        }
        for _ in 0..200 {
            if metrics.render().contains(failed) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(metrics.render().contains(failed), "{}", metrics.render());
        // Within the retry pause: still one call.
        assert!(waker.wake(&model, "", &pods));
        assert!(!metrics.render().contains(r#"outcome="failed"} 2"#));
        // Another group of the model (a pd role) is woken on its own.
        assert!(waker.wake(&model, "decode", &pods));
        // No pod with an address, or waking off: nobody is woken.
        let mut no_addr = (*pods[0]).clone();
        no_addr.addr = None;
        assert!(!waker.wake(&Arc::from("other"), "", &[Arc::new(no_addr)]));
        assert!(!Waker::new(false, metrics).wake(&model, "", &pods), "off: nobody is woken");
    }
}
