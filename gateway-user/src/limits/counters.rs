//! Which store counts, and what happens when the shared one fails.
//!
//! Without Redis every counter is in-process. With Redis every call goes
//! through the circuit breaker and a per-call timeout; when it fails (or the
//! breaker is open, so nothing waits on a dead Redis) the failure mode
//! decides: fail open to the in-process backstop, or refuse (closed).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::breaker::{Breaker, BreakerState};
use super::local_store::{LocalStore, unix_now_ms};
use super::redis_store::RedisStore;
use super::{CounterStore, FailureMode, Slot, StoreError, UserCheck, UserVerdict, WindowVerdict};
use crate::metrics::Metrics;

/// Redis with the breaker and timeout that guard it.
pub(super) struct Shared {
    pub store: RedisStore,
    pub breaker: Breaker,
    pub call_timeout: Duration,
}

/// Where a counted request was counted, so its rollback goes to the same place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Placement {
    Shared,
    Local,
}

/// A store's answer and where it came from.
pub(super) enum Served<T> {
    /// The store that owns the counters answered.
    Counted { value: T, placement: Placement },
    /// Redis failed and the in-process backstop answered (fail-open).
    Backstop(T),
    /// Redis failed and the failure mode is closed.
    Unavailable,
}

/// Store operations, as metric label values.
#[derive(Clone, Copy, Debug)]
enum Op {
    AdmitWindow,
    AdmitUser,
    Release,
    ChargeTokens,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Self::AdmitWindow => "admit_window",
            Self::AdmitUser => "admit_user",
            Self::Release => "release",
            Self::ChargeTokens => "charge_tokens",
        }
    }
}

/// The counters of one gateway.
pub(super) struct Counters {
    shared: Option<Shared>,
    local: LocalStore,
    failure_mode: FailureMode,
    metrics: Arc<Metrics>,
}

impl Counters {
    pub fn new(shared: Option<Shared>, failure_mode: FailureMode, metrics: Arc<Metrics>) -> Self {
        if shared.is_some() {
            metrics.ratelimit_breaker_state(BreakerState::Closed.as_gauge());
        }
        Self { shared, local: LocalStore::new(), failure_mode, metrics }
    }

    /// One guarded Redis call: refused at once while the breaker is open,
    /// bounded by the call timeout, timed, and reported to the breaker.
    async fn call_shared<T>(
        &self,
        shared: &Shared,
        op: Op,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let Some(attempt) = shared.breaker.try_call() else {
            self.metrics.ratelimit_store_error(op.as_str(), StoreError::CircuitOpen.kind());
            return Err(StoreError::CircuitOpen);
        };
        let before = shared.breaker.state();
        let started = Instant::now();
        let result = match tokio::time::timeout(shared.call_timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(shared.call_timeout)),
        };
        self.metrics.ratelimit_store_latency(op.as_str(), started.elapsed().as_secs_f64());
        match &result {
            Ok(_) => attempt.succeeded(),
            Err(err) => {
                attempt.failed();
                self.metrics.ratelimit_store_error(op.as_str(), err.kind());
                tracing::debug!(op = op.as_str(), error = %err, "rate-limit store call failed");
            }
        }
        let after = shared.breaker.state();
        if after != before {
            self.metrics.ratelimit_breaker_state(after.as_gauge());
            match (&result, after) {
                (Err(err), BreakerState::Open) => tracing::warn!(
                    error = %err,
                    failure_mode = ?self.failure_mode,
                    "rate-limit store unreachable: circuit open, limits now {}",
                    match self.failure_mode {
                        FailureMode::Open => "enforced per replica (fail-open backstop)",
                        FailureMode::Closed => "refused with 503 (fail-closed)",
                    }
                ),
                (Ok(_), BreakerState::Closed) => tracing::info!("rate-limit store reachable again: circuit closed"),
                _ => {}
            }
        }
        result
    }

    /// Runs `op` on Redis when there is one, else (or when it fails in
    /// fail-open mode) on the in-process store.
    async fn serve<'s, T, F>(
        &'s self,
        op: Op,
        shared_call: impl FnOnce(&'s RedisStore) -> F,
        local: impl FnOnce(&'s LocalStore) -> T,
    ) -> Served<T>
    where
        F: Future<Output = Result<T, StoreError>>,
    {
        let Some(shared) = &self.shared else {
            return Served::Counted { value: local(&self.local), placement: Placement::Local };
        };
        match self.call_shared(shared, op, shared_call(&shared.store)).await {
            Ok(value) => Served::Counted { value, placement: Placement::Shared },
            Err(_) => match self.failure_mode {
                FailureMode::Open => Served::Backstop(local(&self.local)),
                FailureMode::Closed => Served::Unavailable,
            },
        }
    }

    pub async fn admit_window(&self, key: &str, limit: u64) -> Served<WindowVerdict> {
        self.serve(
            Op::AdmitWindow,
            |redis| redis.admit_window(key, limit),
            |local| local.admit_window_at(key, limit, unix_now_ms()),
        )
        .await
    }

    /// `backstop` gives what the in-process store checks if Redis fails (it
    /// cannot read the user's record); `None` admits without counting.
    pub async fn admit_user<'a>(
        &self,
        check: &UserCheck<'a>,
        backstop: impl FnOnce() -> Option<UserCheck<'a>>,
    ) -> Served<UserVerdict> {
        let shared = self.shared.is_some();
        let local = move |local: &LocalStore| {
            if !shared {
                local.admit_user_at(check, unix_now_ms())
            } else if let Some(backstop) = backstop() {
                local.admit_user_at(&backstop, unix_now_ms())
            } else {
                UserVerdict::Admitted {
                    limits: check.limits,
                    rpm_slot: None,
                    requests: None,
                    tokens: None,
                    record_tpm: false,
                }
            }
        };
        self.serve(Op::AdmitUser, |redis| redis.admit_user(check), local).await
    }

    /// A user check with no fallback (AIBrix's rules): Redis's answer or its
    /// failure, whatever the failure mode; in process without Redis.
    pub async fn admit_user_or_fail(&self, check: &UserCheck<'_>) -> Result<UserVerdict, StoreError> {
        match &self.shared {
            None => Ok(self.local.admit_user_at(check, unix_now_ms())),
            Some(shared) => self.call_shared(shared, Op::AdmitUser, shared.store.admit_user(check)).await,
        }
    }

    /// Takes back a counted request from where it was counted.
    pub async fn release(&self, slot: &Slot, placement: Placement) {
        match (placement, &self.shared) {
            (Placement::Shared, Some(shared)) => {
                if let Err(err) = self.call_shared(shared, Op::Release, shared.store.release(slot)).await {
                    tracing::debug!(key = %slot.key, error = %err, "rollback of a rate-limit slot failed");
                }
            }
            _ => self.local.release_now(slot),
        }
    }

    /// Charges `tokens` to `user`'s TPM counter.
    pub async fn charge_tokens(&self, user: &str, tokens: u64) {
        let served = self
            .serve(
                Op::ChargeTokens,
                |redis| redis.charge_tokens(user, tokens),
                |local| local.charge_tokens_at(user, tokens, unix_now_ms()),
            )
            .await;
        if matches!(served, Served::Unavailable) {
            tracing::debug!("token usage not charged: rate-limit store unavailable");
        }
    }
}
