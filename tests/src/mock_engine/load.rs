//! The engine's capacity: a batch of at most `max_running` requests, a FIFO queue in front
//! of it, and a KV cache filled by the running requests' tokens.
//!
//! This is the state `/metrics` reports and routing strategies react to, so it is kept
//! apart from HTTP: a replica planner or a routing simulation can drive it directly.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Semaphore;

/// Running and waiting requests and KV cache occupancy of one engine.
#[derive(Debug)]
pub struct LoadModel {
    slots: Semaphore,
    kv_capacity_tokens: u64,
    running: AtomicU64,
    waiting: AtomicU64,
    kv_tokens: AtomicU64,
}

/// One reading of a [`LoadModel`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadSnapshot {
    /// Requests in the running batch.
    pub running: u64,
    /// Requests queued for a running slot.
    pub waiting: u64,
    /// Share of the KV cache in use, 0.0 to 1.0.
    pub kv_usage: f64,
}

impl LoadModel {
    /// An idle engine. Both arguments must be at least 1 (the command line ensures it).
    pub fn new(max_running: u32, kv_capacity_tokens: u64) -> Self {
        Self {
            slots: Semaphore::new(max_running as usize),
            kv_capacity_tokens: kv_capacity_tokens.max(1),
            running: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            kv_tokens: AtomicU64::new(0),
        }
    }

    /// The current load.
    pub fn snapshot(&self) -> LoadSnapshot {
        let kv_tokens = self.kv_tokens.load(Ordering::Relaxed);
        LoadSnapshot {
            running: self.running.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
            kv_usage: (kv_tokens as f64 / self.kv_capacity_tokens as f64).min(1.0),
        }
    }

    /// A running slot if one is free now, without queueing.
    pub fn try_admit(self: &Arc<Self>, prompt_tokens: u64) -> Option<RunningSlot> {
        let permit = self.slots.try_acquire().ok()?;
        permit.forget();
        Some(self.start_running(prompt_tokens, true))
    }

    /// Waits in FIFO order for a running slot. The request counts as waiting from this call
    /// until it runs or the future is dropped.
    pub fn admit(self: &Arc<Self>, prompt_tokens: u64) -> impl Future<Output = RunningSlot> + Send + 'static {
        let waiting = Waiting::enter(Arc::clone(self));
        async move {
            let load = &waiting.0;
            // The semaphore is never closed, so `Err` cannot happen; were it to, running
            // unthrottled beats failing the request.
            let holds_permit = match load.slots.acquire().await {
                Ok(permit) => {
                    permit.forget();
                    true
                }
                Err(_) => false,
            };
            let load = Arc::clone(load);
            drop(waiting);
            load.start_running(prompt_tokens, holds_permit)
        }
    }

    fn start_running(self: &Arc<Self>, prompt_tokens: u64, holds_permit: bool) -> RunningSlot {
        self.running.fetch_add(1, Ordering::Relaxed);
        self.kv_tokens.fetch_add(prompt_tokens, Ordering::Relaxed);
        RunningSlot { load: Arc::clone(self), kv_tokens: prompt_tokens, holds_permit }
    }
}

/// Counts a request as waiting for as long as it is queued, however the wait ends.
struct Waiting(Arc<LoadModel>);

impl Waiting {
    fn enter(load: Arc<LoadModel>) -> Self {
        load.waiting.fetch_add(1, Ordering::Relaxed);
        Self(load)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request in the running batch. Dropping it (request finished, failed, or its client
/// went away) frees the slot and the request's KV cache tokens.
#[derive(Debug)]
pub struct RunningSlot {
    load: Arc<LoadModel>,
    kv_tokens: u64,
    holds_permit: bool,
}

impl RunningSlot {
    /// Accounts `tokens` more generated tokens in the KV cache.
    pub fn add_generated(&mut self, tokens: u64) {
        self.kv_tokens += tokens;
        self.load.kv_tokens.fetch_add(tokens, Ordering::Relaxed);
    }
}

impl Drop for RunningSlot {
    fn drop(&mut self) {
        self.load.running.fetch_sub(1, Ordering::Relaxed);
        self.load.kv_tokens.fetch_sub(self.kv_tokens, Ordering::Relaxed);
        if self.holds_permit {
            self.load.slots.add_permits(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn queues_beyond_max_running_in_fifo_order() {
        let load = Arc::new(LoadModel::new(1, 100));
        let mut first = load.try_admit(10).unwrap();
        first.add_generated(5);
        assert!(load.try_admit(1).is_none());

        let second = tokio::spawn(load.admit(20));
        tokio::time::sleep(Duration::from_millis(1)).await;
        let third = tokio::spawn(load.admit(30));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(load.snapshot(), LoadSnapshot { running: 1, waiting: 2, kv_usage: 0.15 });

        drop(first);
        let second = second.await.unwrap();
        let snapshot = load.snapshot();
        assert_eq!((snapshot.running, snapshot.waiting), (1, 1));
        assert!((snapshot.kv_usage - 0.2).abs() < 1e-9, "FIFO: the 20-token request runs");

        drop(second);
        drop(third.await.unwrap());
        assert_eq!(load.snapshot(), LoadSnapshot { running: 0, waiting: 0, kv_usage: 0.0 });
    }

    #[tokio::test(start_paused = true)]
    async fn leaving_the_queue_stops_counting_as_waiting() {
        let load = Arc::new(LoadModel::new(1, 100));
        let _running = load.try_admit(1).unwrap();
        let queued = tokio::spawn(load.admit(1));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(load.snapshot().waiting, 1);
        queued.abort();
        let _ = queued.await;
        assert_eq!(load.snapshot().waiting, 0);
    }

    #[test]
    fn kv_usage_is_clamped() {
        let load = Arc::new(LoadModel::new(4, 10));
        let _slot = load.try_admit(25).unwrap();
        assert_eq!(load.snapshot().kv_usage, 1.0);
    }
}
