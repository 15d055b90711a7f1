//! vLLM's sleep mode: the dev-mode `POST /sleep`, `POST /wake_up` and `GET /is_sleeping`
//! endpoints and the `vllm:engine_sleep_state` gauge, so the gateway can be tested against
//! engines that sleep.
//!
//! A sleeping engine refuses inference with 503 (see [`SleepSwitch::refuse`]). vLLM does not:
//! its paused scheduler queues requests until the engine wakes (older versions crashed). The
//! 503 follows the fixes proposed for that (vllm-project/vllm#16536 and #30186, not merged),
//! so a gateway test sees at once that the engine sleeps.
//!
//! `POST /wake_up` answers at once (vLLM answers once awake) and the engine stays asleep
//! until `--wake-delay-ms` has passed. The wake-up deadline is kept as an instant and the
//! state read against the clock, so no task or timer runs and a wake-up never holds a
//! worker; the clock is tokio's, which tests pause.
//!
//! Requests already running when `/sleep` arrives finish normally (vLLM's default `abort`
//! mode would abort them); `/sleep`'s `mode` and `/wake_up`'s `tags` are ignored.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

/// The engine's sleep state, as the `sleep_state` label of `vllm:engine_sleep_state` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SleepState {
    /// Serving.
    Awake,
    /// Sleep level 1: weights offloaded to CPU memory, KV cache discarded.
    WeightsOffloaded,
    /// Sleep level 2: weights and KV cache discarded.
    DiscardAll,
}

impl SleepState {
    /// Every state, in the order vLLM exports the gauge's samples.
    pub const ALL: [SleepState; 3] = [SleepState::Awake, SleepState::WeightsOffloaded, SleepState::DiscardAll];

    /// The `sleep_state` label value, also used in `/mock/stats`.
    pub fn label(self) -> &'static str {
        match self {
            SleepState::Awake => "awake",
            SleepState::WeightsOffloaded => "weights_offloaded",
            SleepState::DiscardAll => "discard_all",
        }
    }

    /// Whether the engine is sleeping at some level.
    pub fn is_asleep(self) -> bool {
        self != SleepState::Awake
    }
}

/// A level `POST /sleep` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SleepLevel {
    /// Level 1 (the default): offload the weights.
    One,
    /// Level 2: discard everything.
    Two,
}

impl SleepLevel {
    /// The level of a `level=` query value (vLLM reads it as an integer), or why it is refused.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value.trim().parse::<i64>() {
            Ok(1) => Ok(SleepLevel::One),
            Ok(2) => Ok(SleepLevel::Two),
            _ => Err(format!("sleep level must be 1 or 2, got {value:?}")),
        }
    }

    /// The state an engine sleeping at this level is in.
    pub fn state(self) -> SleepState {
        match self {
            SleepLevel::One => SleepState::WeightsOffloaded,
            SleepLevel::Two => SleepState::DiscardAll,
        }
    }
}

/// Where the engine is between sleeping and serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Phase {
    /// The state until `wakes_at`.
    state: SleepState,
    /// When a wake-up asked for completes; `None` when none is pending.
    wakes_at: Option<Instant>,
}

impl Phase {
    const AWAKE: Phase = Phase { state: SleepState::Awake, wakes_at: None };

    /// This phase as it stands at `now`: awake once a pending wake-up is due.
    fn at(self, now: Instant) -> Self {
        match self.wakes_at {
            Some(at) if at <= now => Phase::AWAKE,
            _ => self,
        }
    }
}

/// The sleep state shared by all connections, and the sleep calls counted for `/mock/stats`.
#[derive(Debug)]
pub struct SleepSwitch {
    /// How long a wake-up takes.
    wake_delay: Duration,
    /// Plain data, so a panic elsewhere cannot leave it half-written.
    phase: Mutex<Phase>,
    sleep_calls: AtomicU64,
    wake_up_calls: AtomicU64,
    refused_while_asleep: AtomicU64,
}

impl SleepSwitch {
    /// A switch starting asleep at level 1 when `sleeping`, else awake, whose wake-ups take
    /// `wake_delay`.
    pub fn new(sleeping: bool, wake_delay: Duration) -> Self {
        let state = if sleeping { SleepLevel::One.state() } else { SleepState::Awake };
        Self {
            wake_delay,
            phase: Mutex::new(Phase { state, wakes_at: None }),
            sleep_calls: AtomicU64::new(0),
            wake_up_calls: AtomicU64::new(0),
            refused_while_asleep: AtomicU64::new(0),
        }
    }

    /// The phase now, with a wake-up that came due applied.
    fn settle(&self) -> (MutexGuard<'_, Phase>, Instant) {
        let now = Instant::now();
        let mut phase = self.phase.lock().unwrap_or_else(PoisonError::into_inner);
        *phase = phase.at(now);
        (phase, now)
    }

    /// The state now.
    pub fn state(&self) -> SleepState {
        self.settle().0.state
    }

    /// Whether the engine sleeps now (`GET /is_sleeping`); true while a wake-up is pending.
    pub fn is_sleeping(&self) -> bool {
        self.state().is_asleep()
    }

    /// Counts a `POST /sleep`, including one whose level is refused.
    pub fn count_sleep_call(&self) {
        self.sleep_calls.fetch_add(1, Ordering::Relaxed);
    }

    /// Puts the engine to sleep at `level`, from any state: a sleeping engine takes the new
    /// level (vLLM's gauge does the same) and a pending wake-up is cancelled.
    pub fn sleep(&self, level: SleepLevel) {
        let (mut phase, _) = self.settle();
        *phase = Phase { state: level.state(), wakes_at: None };
    }

    /// Counts a `POST /wake_up` and starts waking a sleeping engine: it is awake once the
    /// wake delay has passed (at once with no delay). A wake-up already pending keeps its
    /// deadline; an awake engine stays as it is.
    pub fn wake_up(&self) {
        self.wake_up_calls.fetch_add(1, Ordering::Relaxed);
        let (mut phase, now) = self.settle();
        if phase.state.is_asleep() && phase.wakes_at.is_none() {
            // An instant too far to represent never comes: the engine sleeps on.
            phase.wakes_at = now.checked_add(self.wake_delay);
            *phase = phase.at(now);
        }
    }

    /// Whether an inference request arriving now must be refused because the engine
    /// sleeps; a refusal is counted.
    pub fn refuse(&self) -> bool {
        let asleep = self.is_sleeping();
        if asleep {
            self.refused_while_asleep.fetch_add(1, Ordering::Relaxed);
        }
        asleep
    }

    /// The `sleep` part of `/mock/stats`.
    pub fn to_json(&self) -> Value {
        let phase = *self.settle().0;
        json!({
            "state": phase.state.label(),
            "waking": phase.wakes_at.is_some(),
            "sleep_calls": self.sleep_calls.load(Ordering::Relaxed),
            "wake_up_calls": self.wake_up_calls.load(Ordering::Relaxed),
            "refused_while_asleep": self.refused_while_asleep.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::advance;

    use super::*;

    const DELAY: Duration = Duration::from_millis(200);

    #[test]
    fn levels_parse_as_vllm_reads_them() {
        assert_eq!(SleepLevel::parse("1"), Ok(SleepLevel::One));
        assert_eq!(SleepLevel::parse(" 02"), Ok(SleepLevel::Two));
        for bad in ["0", "3", "-1", "one", ""] {
            assert!(SleepLevel::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(SleepLevel::Two.state().label(), "discard_all");
    }

    #[tokio::test(start_paused = true)]
    async fn sleeps_at_the_level_asked_and_counts_calls() {
        let switch = SleepSwitch::new(false, DELAY);
        assert_eq!(switch.state(), SleepState::Awake);
        assert!(!switch.refuse());

        switch.count_sleep_call();
        switch.sleep(SleepLevel::One);
        assert_eq!(switch.state(), SleepState::WeightsOffloaded);
        assert!(switch.is_sleeping() && switch.refuse());
        // A second sleep takes the new level.
        switch.count_sleep_call();
        switch.sleep(SleepLevel::Two);
        assert_eq!(switch.state(), SleepState::DiscardAll);
        assert!(switch.refuse());

        let stats = switch.to_json();
        assert_eq!(
            stats,
            json!({"state": "discard_all", "waking": false, "sleep_calls": 2, "wake_up_calls": 0,
                "refused_while_asleep": 2})
        );
    }

    #[tokio::test(start_paused = true)]
    async fn wakes_after_the_delay_which_a_second_wake_up_does_not_restart() {
        let switch = SleepSwitch::new(true, DELAY);
        assert_eq!(switch.state(), SleepState::WeightsOffloaded);
        switch.wake_up();
        assert_eq!(switch.to_json()["waking"], true);
        advance(Duration::from_millis(150)).await;
        switch.wake_up();
        assert!(switch.is_sleeping());
        advance(Duration::from_millis(49)).await;
        assert!(switch.refuse(), "still asleep 1 ms before the delay is over");
        advance(Duration::from_millis(1)).await;
        assert_eq!(switch.state(), SleepState::Awake);
        assert!(!switch.refuse());

        // Waking an awake engine changes nothing but the count.
        switch.wake_up();
        assert_eq!(
            switch.to_json(),
            json!({"state": "awake", "waking": false, "sleep_calls": 0, "wake_up_calls": 3,
                "refused_while_asleep": 1})
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_cancels_a_pending_wake_up_and_no_delay_wakes_at_once() {
        let switch = SleepSwitch::new(true, DELAY);
        switch.wake_up();
        advance(Duration::from_millis(100)).await;
        switch.sleep(SleepLevel::Two);
        advance(DELAY).await;
        assert_eq!(switch.state(), SleepState::DiscardAll, "the sleep after the wake-up wins");
        switch.wake_up();
        advance(DELAY).await;
        assert_eq!(switch.state(), SleepState::Awake, "a new wake-up starts a new delay");

        let instant = SleepSwitch::new(true, Duration::ZERO);
        instant.wake_up();
        assert_eq!(instant.state(), SleepState::Awake);
        assert_eq!(instant.to_json()["waking"], false);
    }
}
