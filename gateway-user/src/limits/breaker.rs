//! A circuit breaker in front of the shared counter store.
//!
//! After `failure_threshold` consecutive failures the breaker opens: calls are
//! refused at once (the caller falls back without waiting on a dead Redis).
//! After `cool_down` one call is let through as a probe (half-open); its
//! success closes the breaker, its failure opens it for another cool-down.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// What the breaker currently lets through (also exported as a gauge).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Every call goes to the store.
    Closed,
    /// One probe call is in flight; the others are refused.
    HalfOpen,
    /// Calls are refused until the cool-down ends.
    Open,
}

impl BreakerState {
    /// Gauge value: 0 closed, 1 half-open, 2 open.
    pub fn as_gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
        }
    }
}

#[derive(Debug)]
enum State {
    Closed { consecutive_failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

/// Circuit breaker; cheap to consult (one uncontended mutex).
#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
    failure_threshold: u32,
    cool_down: Duration,
}

/// Permission to make one call. Report how it went with
/// [`Attempt::succeeded`] or [`Attempt::failed`]; a probe dropped without a
/// report (its request was cancelled) counts as failed, so the breaker never
/// stays half-open waiting for an answer that will not come.
#[must_use = "report the outcome of the call"]
pub struct Attempt<'a> {
    breaker: &'a Breaker,
    probe: bool,
    reported: bool,
}

impl Breaker {
    /// A closed breaker. `failure_threshold` is raised to at least 1.
    pub fn new(failure_threshold: u32, cool_down: Duration) -> Self {
        Self {
            state: Mutex::new(State::Closed { consecutive_failures: 0 }),
            failure_threshold: failure_threshold.max(1),
            cool_down,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a plain value, always consistent: a panic elsewhere
        // while holding the lock cannot leave it half-written.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The current state, as seen by the next call.
    pub fn state(&self) -> BreakerState {
        match &*self.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::HalfOpen => BreakerState::HalfOpen,
            State::Open { .. } => BreakerState::Open,
        }
    }

    /// Asks to make one call; `None` means refused (breaker open, or a probe
    /// is already in flight).
    pub fn try_call(&self) -> Option<Attempt<'_>> {
        let mut state = self.lock();
        let probe = match &*state {
            State::Closed { .. } => false,
            State::HalfOpen => return None,
            State::Open { until } if Instant::now() < *until => return None,
            State::Open { .. } => {
                *state = State::HalfOpen;
                true
            }
        };
        Some(Attempt { breaker: self, probe, reported: false })
    }

    fn record_success(&self) {
        // Any success shows the store answers again.
        *self.lock() = State::Closed { consecutive_failures: 0 };
    }

    fn record_failure(&self, probe: bool) {
        let mut state = self.lock();
        let open = State::Open { until: Instant::now() + self.cool_down };
        match &mut *state {
            State::Closed { consecutive_failures } => {
                *consecutive_failures += 1;
                if *consecutive_failures >= self.failure_threshold {
                    *state = open;
                }
            }
            State::HalfOpen if probe => *state = open,
            // A call started before the breaker opened, or while another
            // probe is out: the probe decides.
            State::HalfOpen | State::Open { .. } => {}
        }
    }
}

impl Attempt<'_> {
    /// The call succeeded.
    pub fn succeeded(mut self) {
        self.reported = true;
        self.breaker.record_success();
    }

    /// The call failed or timed out.
    pub fn failed(mut self) {
        self.reported = true;
        self.breaker.record_failure(self.probe);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.reported && self.probe {
            self.breaker.record_failure(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOL_DOWN: Duration = Duration::from_millis(500);

    fn fail(b: &Breaker) {
        b.try_call().expect("call allowed").failed();
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_only() {
        let b = Breaker::new(3, COOL_DOWN);
        fail(&b);
        fail(&b);
        b.try_call().expect("allowed").succeeded();
        fail(&b);
        fail(&b);
        assert_eq!(b.state(), BreakerState::Closed, "a success resets the count");
        fail(&b);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.try_call().is_none(), "open breaker refuses at once");
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_probe_after_cool_down_closes_on_success() {
        let b = Breaker::new(1, COOL_DOWN);
        fail(&b);
        tokio::time::advance(COOL_DOWN - Duration::from_millis(1)).await;
        assert!(b.try_call().is_none(), "still cooling down");
        tokio::time::advance(Duration::from_millis(1)).await;
        let probe = b.try_call().expect("probe allowed after cool-down");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.try_call().is_none(), "only one probe at a time");
        probe.succeeded();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.try_call().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_opens_for_another_cool_down() {
        let b = Breaker::new(2, COOL_DOWN);
        fail(&b);
        fail(&b);
        tokio::time::advance(COOL_DOWN).await;
        b.try_call().expect("probe").failed();
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(COOL_DOWN / 2).await;
        assert!(b.try_call().is_none());
        tokio::time::advance(COOL_DOWN / 2).await;
        assert!(b.try_call().is_some(), "next probe after a full cool-down");
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_probe_counts_as_failure() {
        let b = Breaker::new(1, COOL_DOWN);
        fail(&b);
        tokio::time::advance(COOL_DOWN).await;
        drop(b.try_call().expect("probe"));
        assert_eq!(b.state(), BreakerState::Open, "not stuck half-open");
        tokio::time::advance(COOL_DOWN).await;
        assert!(b.try_call().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn late_failure_of_an_old_call_does_not_reopen_a_probe() {
        let b = Breaker::new(1, COOL_DOWN);
        let old = b.try_call().expect("closed");
        fail(&b);
        tokio::time::advance(COOL_DOWN).await;
        let probe = b.try_call().expect("probe");
        old.failed();
        assert_eq!(b.state(), BreakerState::HalfOpen, "the probe decides");
        probe.succeeded();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn cancelled_ordinary_call_is_not_a_failure() {
        let b = Breaker::new(1, COOL_DOWN);
        drop(b.try_call().expect("closed"));
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
