//! Sleeping engines (vLLM's sleep mode). A pod whose engine says it sleeps
//! (`vllm:engine_sleep_state`) gets no requests: routing skips it. When every
//! ready pod of a model sleeps the request gets 503; with
//! `--wake-sleeping-models` one of them is asked to wake up (`POST
//! /wake_up`) first, once per model however many requests arrive, and the
//! 503 says to retry (`Retry-After`). A failed call may be made again a few
//! seconds later; a call under way is not repeated until its answer or its
//! timeout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
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
/// After a failed call, how long before another may be made.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// Asks sleeping models' pods to wake up, once per model at a time.
pub struct Waker {
    enabled: bool,
    client: Client<HttpConnector, Empty<Bytes>>,
    /// Per model: until when no new call is made.
    asked: Arc<Mutex<HashMap<Arc<str>, Instant>>>,
    /// `asked` holds a model: requests for models with awake pods look.
    pending: AtomicBool,
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
            pending: AtomicBool::new(false),
            metrics,
        }
    }

    /// Every ready pod of `model` (`sleeping`, never empty) sleeps: asks one
    /// to wake up unless a call is under way. Whether the model is being
    /// woken (the client may retry shortly).
    pub fn wake(&self, model: &Arc<str>, sleeping: &[Arc<PodInfo>]) -> bool {
        if !self.enabled {
            return false;
        }
        let now = Instant::now();
        {
            let mut asked = self.asked.lock().unwrap_or_else(PoisonError::into_inner);
            if asked.get(model).is_some_and(|until| *until > now) {
                return true;
            }
            asked.insert(Arc::clone(model), now + WAKE_TIMEOUT);
            self.pending.store(true, Ordering::Relaxed);
        }
        let Some(pod) = sleeping.get(rand::random_range(0..sleeping.len().max(1))).cloned() else {
            return false;
        };
        let Some(addr) = pod.addr else { return false };
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
            match outcome {
                Ok(()) => {
                    metrics.model_wakeup(&model, "woken");
                    tracing::info!(model = &*model, pod = %pod.name, "woke a sleeping model's pod");
                }
                Err(error) => {
                    metrics.model_wakeup(&model, "failed");
                    tracing::warn!(model = &*model, pod = %pod.name, error, "waking a sleeping model's pod failed");
                    // Another call may go out shortly (to this pod or another).
                    let mut asked = asked.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Some(until) = asked.get_mut(&model) {
                        *until = Instant::now() + RETRY_AFTER_FAILURE;
                    }
                }
            }
        });
        true
    }

    /// `model` has an awake pod: the next time all its pods sleep, it is
    /// woken anew.
    pub fn awake(&self, model: &str) {
        if !self.pending.load(Ordering::Relaxed) {
            return;
        }
        let mut asked = self.asked.lock().unwrap_or_else(PoisonError::into_inner);
        asked.remove(model);
        self.pending.store(!asked.is_empty(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::test_support::pod;

    #[tokio::test]
    async fn one_call_per_model_until_it_wakes() {
        let metrics = Arc::new(Metrics::new());
        let waker = Waker::new(true, Arc::clone(&metrics));
        let model: Arc<str> = Arc::from("m");
        // Port 1: nothing listens there, so the call fails at once.
        let mut closed = (*pod(0, 0).0).clone();
        closed.addr = Some(([127, 0, 0, 1], 1).into());
        let pods = vec![Arc::new(closed)];
        let calls = || {
            let text = metrics.render();
            text.lines().filter(|l| l.starts_with("aibrix_gateway_model_wakeups_total{")).count()
        };
        assert!(waker.wake(&model, &pods), "a wake-up is under way");
        for _ in 0..20 {
            assert!(waker.wake(&model, &pods), "still under way, not asked again");
        }
        // The one call fails (nothing listens on the pod's port) and is counted.
        for _ in 0..200 {
            if calls() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(metrics.render().contains(r#"aibrix_gateway_model_wakeups_total{model="m",outcome="failed"} 1"#));
        // Awake again: the next sleep is woken anew (here: at once).
        waker.awake("m");
        assert!(!waker.pending.load(Ordering::Relaxed));
        assert!(waker.wake(&model, &pods));
        assert!(!Waker::new(false, metrics).wake(&model, &pods), "off: nobody is woken");
    }
}
