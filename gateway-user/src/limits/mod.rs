//! Limits: model RPS caps per (model, profile), per-user RPM/TPM keyed by
//! the `user` header, and optional bearer auth. Refusals are [`LimitError`]s;
//! what they look like on the wire is `errors`' business.
//!
//! The proxy calls [`Limits::authorize`] before reading the body and
//! [`Limits::admit`] in its limit phase. Admission returns an [`Admission`]:
//! the counted requests, to roll back if routing fails, and a
//! [`TokenCharge`] that bills the answer's tokens to the user's TPM when the
//! response ends.
//!
//! Counters live in Redis when `--redis-url` is set (shared by all replicas,
//! windows from Redis time, each check one atomic script), else in process.
//! Redis failures are handled in `counters.rs`: timeout, circuit breaker, then
//! fail open to the in-process backstop or fail closed with 503.
//!
//! Per-user limits follow one of two rule sets ([`UserLimitsMode`]):
//! Turnstile's (the default) or AIBrix's, exactly as its gateway applies them.
//! Both count in the same keys and windows, through the same stores.

pub mod auth;
pub mod breaker;
mod counters;
pub mod local_store;
pub mod quota;
pub mod redis_store;
pub mod users;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;

use crate::metrics::Metrics;
pub use auth::BearerAuth;
use counters::{Counters, Placement, Served, Shared};
pub use quota::{Quota, QuotaUnit};
pub use users::{UserDirectory, UserRecord};

/// Why the limits refused a request. The proxy answers each with its own
/// status, body and headers (`impl From<LimitError> for GatewayError`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitError {
    /// Bearer auth is on and the request lacks the token.
    Unauthorized,
    /// Redis could not answer and the failure mode is `closed`.
    StoreUnavailable,
    /// The user's requests per minute are used up.
    UserRpm { user: String, quota: Quota },
    /// The user's tokens per minute are used up.
    UserTpm { user: String, quota: Quota },
    /// The model's (per profile) requests per second are used up.
    ModelRps { model: String, quota: Quota },
    /// AIBrix rules: the user's record could not be read. `reason` is what
    /// AIBrix answers: `redis: nil` when there is no record.
    UserRecord { reason: String, store_failed: bool },
    /// AIBrix rules: the store failed counting a user from the users file.
    UserCounter { user: String },
    /// AIBrix rules: a streamed chat completion of a user whose record sets a
    /// TPM does not ask for `stream_options.include_usage`.
    StreamUsageRequired,
}

/// Whose rules the per-user RPM/TPM limits follow (`--user-limits`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UserLimitsMode {
    /// Turnstile's: a user without a record gets `--default-user-rpm/-tpm`
    /// (no limit unless set); a refused request is not counted; Redis trouble
    /// follows `--ratelimit-failure-mode`.
    #[default]
    Turnstile,
    /// AIBrix's: a user without a record is refused (500, `redis: nil`);
    /// rpm 0 is 100 and tpm 0 is rpm × 1000; the request counts against RPM
    /// before TPM is checked; a streamed chat of a user whose record sets a TPM
    /// must ask for usage (400); Redis trouble on a user check is a 500.
    Aibrix,
}

/// Whether an answer reports its token usage to the client: AIBrix bills
/// TPM from the usage it sees pass, and requires it of some streams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StreamUsage {
    /// Not streamed, or streamed with `stream_options.include_usage: true`
    /// (or an endpoint whose streams always end with usage).
    #[default]
    Reported,
    /// A streamed `/v1/chat/completions` without `include_usage`.
    ChatWithout,
    /// Another stream without `include_usage` (`/v1/completions`).
    OtherWithout,
}

/// What to do when Redis cannot answer a limit check in time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailureMode {
    /// Admit, enforcing the limits per replica with the in-process backstop.
    #[default]
    Open,
    /// Refuse with 503.
    Closed,
}

impl std::fmt::Display for FailureMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Open => "open",
            Self::Closed => "closed",
        })
    }
}

impl std::str::FromStr for FailureMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "open" => Ok(Self::Open),
            "closed" => Ok(Self::Closed),
            other => Err(format!("expected `open` or `closed`, got `{other}`")),
        }
    }
}

/// A user's limits; `None` is no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserLimits {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens (`usage.total_tokens`) per minute.
    pub tpm: Option<u64>,
}

impl UserLimits {
    pub fn any(&self) -> bool {
        self.rpm.is_some() || self.tpm.is_some()
    }
}

/// One user check handed to a store.
#[derive(Clone, Copy, Debug)]
pub struct UserCheck<'a> {
    pub user: &'a str,
    /// Limits to apply when the user has no Redis record (or it is not read).
    pub limits: UserLimits,
    /// Read the user's `aibrix-users/<user>` record, whose limits win.
    pub lookup_record: bool,
    /// The rules: with AIBrix's, a missing record refuses the user, a record's
    /// 0s take AIBrix's defaults, and RPM is counted before TPM is checked.
    pub mode: UserLimitsMode,
    /// The user's record (from the users file) sets a TPM above 0.
    pub record_tpm: bool,
}

/// A counted request: its counter and window, for a rollback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Counter key without the window.
    pub key: String,
    /// The window (store-specific number) the request was counted in.
    pub window: u64,
}

/// Answer to a window check, with where the window stands.
#[derive(Debug, PartialEq, Eq)]
pub enum WindowVerdict {
    Admitted { slot: Slot, quota: Quota },
    Limited { quota: Quota },
}

/// Answer to a user check. Refused requests are not counted.
#[derive(Debug, PartialEq, Eq)]
pub enum UserVerdict {
    /// Within both limits; the RPM slot when RPM is limited, and what is
    /// left of each limit the user has.
    Admitted {
        limits: UserLimits,
        rpm_slot: Option<Slot>,
        requests: Option<Quota>,
        tokens: Option<Quota>,
        /// The user's record sets a TPM above 0 (not a default).
        record_tpm: bool,
    },
    RpmExceeded {
        quota: Quota,
    },
    TpmExceeded {
        quota: Quota,
    },
    /// AIBrix rules: the record is missing or unusable; `reason` says which.
    NoRecord {
        reason: String,
    },
}

/// What is left of a user's limits after an admitted request: the
/// `x-ratelimit-*` headers of its answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserQuotas {
    /// RPM, when the user has one.
    pub requests: Option<Quota>,
    /// TPM, when the user has one.
    pub tokens: Option<Quota>,
}

impl UserQuotas {
    /// Writes the headers of each limit the user has.
    pub fn insert_headers(&self, headers: &mut HeaderMap) {
        if let Some(requests) = &self.requests {
            requests.insert_headers(QuotaUnit::Requests, headers);
        }
        if let Some(tokens) = &self.tokens {
            tokens.insert_headers(QuotaUnit::Tokens, headers);
        }
    }
}

/// Why the counter store did not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("circuit open after repeated failures")]
    CircuitOpen,
    #[error("{0}")]
    Redis(String),
}

impl StoreError {
    /// Metric label value.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::CircuitOpen => "circuit_open",
            Self::Redis(_) => "error",
        }
    }
}

/// Fixed-window counters. Every check-and-count is one atomic step in the
/// store, so concurrent requests (and replicas sharing the store) never
/// admit more than the limit.
pub trait CounterStore: Send + Sync {
    /// Counts one request in the current 1-second window of `key`, unless
    /// `limit` requests are counted there already.
    fn admit_window(&self, key: &str, limit: u64) -> impl Future<Output = Result<WindowVerdict, StoreError>> + Send;

    /// Checks the user's RPM and TPM in the current minute and counts the
    /// request against RPM when both allow it.
    fn admit_user(&self, check: &UserCheck<'_>) -> impl Future<Output = Result<UserVerdict, StoreError>> + Send;

    /// Takes back one counted request (routing failed after admission).
    fn release(&self, slot: &Slot) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Adds an answer's tokens to the user's TPM counter of the current minute.
    fn charge_tokens(&self, user: &str, tokens: u64) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Model RPS counter of a (model, profile), without the window second.
pub fn rps_counter_key(model: &str, profile: &str) -> String {
    format!("aibrix_model:{model}:{profile}:rps")
}

/// A user's RPM counter (AIBrix's name), without the minute bin.
pub fn rpm_counter_key(user: &str) -> String {
    format!("aibrix:{user}_RPM_CURRENT")
}

/// A user's TPM counter (AIBrix's name), without the minute bin.
pub fn tpm_counter_key(user: &str) -> String {
    format!("aibrix:{user}_TPM_CURRENT")
}

/// A user's record (AIBrix's name).
pub fn user_record_key(user: &str) -> String {
    format!("aibrix-users/{user}")
}

/// Which limit a decision is about (metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKind {
    Rps,
    Rpm,
    Tpm,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rps => "rps",
            Self::Rpm => "rpm",
            Self::Tpm => "tpm",
        }
    }
}

/// How a limit check ended (metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Limited,
    /// Redis failed; admitted (fail-open).
    StoreErrorAllowed,
    /// Redis failed; refused (fail-closed).
    StoreErrorDenied,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Limited => "limited",
            Self::StoreErrorAllowed => "store_error_allowed",
            Self::StoreErrorDenied => "store_error_denied",
        }
    }
}

/// Settings of the limiter (set by `turnstile serve` flags, whose defaults these are).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Shared counters; `None` counts in process (per replica).
    pub redis_url: Option<String>,
    pub failure_mode: FailureMode,
    /// Bound of one Redis call.
    pub redis_call_timeout: Duration,
    /// Consecutive Redis failures that open the circuit.
    pub breaker_failures: u32,
    /// Time the circuit stays open before a probe.
    pub breaker_cool_down: Duration,
    /// Users from a users file (win over Redis records).
    pub users: Vec<UserRecord>,
    /// Limits of users without a record.
    pub default_user: UserLimits,
    /// Required `Authorization: Bearer` token; `None` disables auth.
    pub bearer_token: Option<String>,
    /// Whose rules per-user limits follow.
    pub user_limits: UserLimitsMode,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            failure_mode: FailureMode::Open,
            redis_call_timeout: Duration::from_millis(50),
            breaker_failures: 3,
            breaker_cool_down: Duration::from_millis(500),
            users: Vec::new(),
            default_user: UserLimits::default(),
            bearer_token: None,
            user_limits: UserLimitsMode::Turnstile,
        }
    }
}

/// What the limit phase knows about a request.
#[derive(Clone, Copy, Debug)]
pub struct LimitRequest<'a> {
    /// Discovered model name (metric label and counter key).
    pub model: &'a Arc<str>,
    /// Resolved profile name.
    pub profile: &'a str,
    /// The profile's `requestsPerSecond`, when it caps.
    pub rps_cap: Option<u64>,
    /// The `user` header.
    pub user: Option<&'a str>,
    /// Whether the answer reports usage (AIBrix rules only).
    pub stream_usage: StreamUsage,
}

/// The gateway's limits.
pub struct Limits {
    auth: Option<BearerAuth>,
    users: UserDirectory,
    counters: Arc<Counters>,
    metrics: Arc<Metrics>,
}

impl Limits {
    /// Builds the limiter. With a Redis URL this must run inside the tokio
    /// runtime; it does not connect (the first check does), so the gateway
    /// starts while Redis is down.
    pub fn new(config: LimitsConfig, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        let LimitsConfig {
            redis_url,
            failure_mode,
            redis_call_timeout,
            breaker_failures,
            breaker_cool_down,
            users,
            default_user,
            bearer_token,
            user_limits,
        } = config;
        let shared = match redis_url {
            Some(url) => Some(Shared {
                store: redis_store::RedisStore::connect_lazily(&url, redis_call_timeout)?,
                breaker: breaker::Breaker::new(breaker_failures, breaker_cool_down),
                call_timeout: redis_call_timeout,
            }),
            None => None,
        };
        let users = UserDirectory::new(&users, default_user, shared.is_some(), user_limits);
        Ok(Self {
            auth: BearerAuth::new(bearer_token.as_deref()),
            users,
            counters: Arc::new(Counters::new(shared, failure_mode, Arc::clone(&metrics))),
            metrics,
        })
    }

    /// In-process limiter with no users and no auth: model RPS caps still apply.
    pub fn in_process(metrics: Arc<Metrics>) -> Self {
        let counters = Arc::new(Counters::new(None, FailureMode::Open, Arc::clone(&metrics)));
        let users = UserDirectory::new(&[], UserLimits::default(), false, UserLimitsMode::Turnstile);
        Self { auth: None, users, counters, metrics }
    }

    /// Bearer auth, when configured.
    pub fn authorize(&self, headers: &HeaderMap) -> Result<(), LimitError> {
        match &self.auth {
            Some(auth) if !auth.allows(headers) => Err(LimitError::Unauthorized),
            _ => Ok(()),
        }
    }

    /// Checks and counts the user's RPM/TPM, then the model's RPS cap. On
    /// refusal nothing stays counted (Turnstile rules; AIBrix's keep what
    /// AIBrix keeps, see [`Limits::admit_aibrix_user`]).
    pub async fn admit(&self, request: &LimitRequest<'_>) -> Result<Admission, LimitError> {
        let mut admission = Admission {
            counters: Arc::clone(&self.counters),
            held: Vec::new(),
            charge: None,
            quotas: UserQuotas::default(),
        };
        if let Some(user) = request.user.filter(|u| !u.is_empty()) {
            match self.users.mode() {
                UserLimitsMode::Turnstile => self.admit_user(user, request, &mut admission).await?,
                UserLimitsMode::Aibrix => self.admit_aibrix_user(user, request, &mut admission).await?,
            }
        }

        if let Some(cap) = request.rps_cap {
            let key = rps_counter_key(request.model, request.profile);
            let (verdict, placement, decision) = match self.counters.admit_window(&key, cap).await {
                Served::Counted { value, placement } => (value, placement, Decision::Allowed),
                Served::Backstop(value) => (value, Placement::Local, Decision::StoreErrorAllowed),
                Served::Unavailable => {
                    self.decided(request, LimitKind::Rps, Decision::StoreErrorDenied);
                    admission.release().await;
                    return Err(LimitError::StoreUnavailable);
                }
            };
            match verdict {
                WindowVerdict::Admitted { slot, .. } => {
                    self.decided(request, LimitKind::Rps, decision);
                    admission.held.push((slot, placement));
                }
                WindowVerdict::Limited { quota } => {
                    self.decided(request, LimitKind::Rps, Decision::Limited);
                    admission.release().await;
                    return Err(LimitError::ModelRps { model: request.model.to_string(), quota });
                }
            }
        }
        Ok(admission)
    }

    /// Turnstile's rules: the users file, else the Redis record, else the
    /// defaults; Redis trouble follows the failure mode.
    async fn admit_user(
        &self,
        user: &str,
        request: &LimitRequest<'_>,
        admission: &mut Admission,
    ) -> Result<(), LimitError> {
        let Some(check) = self.users.check(user) else { return Ok(()) };
        let served = self.counters.admit_user(&check, || self.users.backstop_check(user)).await;
        let (verdict, placement, decision) = match served {
            Served::Counted { value, placement } => {
                if let (UserVerdict::Admitted { limits, .. }, Placement::Shared) = (&value, placement) {
                    self.users.remember(user, *limits);
                }
                (value, placement, Decision::Allowed)
            }
            Served::Backstop(value) => (value, Placement::Local, Decision::StoreErrorAllowed),
            Served::Unavailable => {
                let kind = if check.limits.rpm.is_none() && check.limits.tpm.is_some() {
                    LimitKind::Tpm
                } else {
                    LimitKind::Rpm
                };
                self.decided(request, kind, Decision::StoreErrorDenied);
                return Err(LimitError::StoreUnavailable);
            }
        };
        match verdict {
            UserVerdict::Admitted { limits, rpm_slot, requests, tokens, .. } => {
                admission.quotas = UserQuotas { requests, tokens };
                if limits.rpm.is_some() {
                    self.decided(request, LimitKind::Rpm, decision);
                }
                if limits.tpm.is_some() {
                    self.decided(request, LimitKind::Tpm, decision);
                    admission.charge =
                        Some(TokenCharge { counters: Arc::clone(&self.counters), user: user.to_owned() });
                }
                admission.held.extend(rpm_slot.map(|slot| (slot, placement)));
                Ok(())
            }
            refused => Err(self.user_refused(user, request, refused)),
        }
    }

    /// AIBrix's rules, as its gateway applies them: the record (users file,
    /// else Redis) must exist; its 0s take AIBrix's defaults; RPM is counted
    /// before TPM is checked and never given back (not on a TPM refusal, not
    /// on the 400 for a stream without usage, not when routing fails); Redis
    /// trouble is a 500, whatever the failure mode. Tokens are billed when the
    /// client's answer reports them, as AIBrix reads them from what passes.
    async fn admit_aibrix_user(
        &self,
        user: &str,
        request: &LimitRequest<'_>,
        admission: &mut Admission,
    ) -> Result<(), LimitError> {
        let Some(check) = self.users.aibrix_check(user) else {
            return Err(LimitError::UserRecord { reason: users::NO_RECORD.to_owned(), store_failed: false });
        };
        let verdict = match self.counters.admit_user_or_fail(&check).await {
            Ok(verdict) => verdict,
            Err(err) => {
                self.decided(request, LimitKind::Rpm, Decision::StoreErrorDenied);
                return Err(if check.lookup_record {
                    LimitError::UserRecord { reason: err.to_string(), store_failed: true }
                } else {
                    LimitError::UserCounter { user: user.to_owned() }
                });
            }
        };
        match verdict {
            UserVerdict::Admitted { requests, tokens, record_tpm, .. } => {
                self.decided(request, LimitKind::Rpm, Decision::Allowed);
                self.decided(request, LimitKind::Tpm, Decision::Allowed);
                if record_tpm && request.stream_usage == StreamUsage::ChatWithout {
                    return Err(LimitError::StreamUsageRequired);
                }
                admission.quotas = UserQuotas { requests, tokens };
                if request.stream_usage == StreamUsage::Reported {
                    admission.charge =
                        Some(TokenCharge { counters: Arc::clone(&self.counters), user: user.to_owned() });
                }
                Ok(())
            }
            refused => Err(self.user_refused(user, request, refused)),
        }
    }

    /// The refusal for a user verdict other than `Admitted`.
    fn user_refused(&self, user: &str, request: &LimitRequest<'_>, verdict: UserVerdict) -> LimitError {
        match verdict {
            UserVerdict::RpmExceeded { quota } => {
                self.decided(request, LimitKind::Rpm, Decision::Limited);
                LimitError::UserRpm { user: user.to_owned(), quota }
            }
            UserVerdict::TpmExceeded { quota } => {
                self.decided(request, LimitKind::Tpm, Decision::Limited);
                LimitError::UserTpm { user: user.to_owned(), quota }
            }
            UserVerdict::NoRecord { reason } => LimitError::UserRecord { reason, store_failed: false },
            UserVerdict::Admitted { .. } => unreachable!("an admitted user is not refused"),
        }
    }

    fn decided(&self, request: &LimitRequest<'_>, limit: LimitKind, decision: Decision) {
        self.metrics.ratelimit_decision(request.model, request.profile, limit.as_str(), decision.as_str());
    }
}

/// Requests counted for one admitted request. [`Admission::release`] takes
/// them back (routing failed); [`Admission::commit`] keeps them (the request
/// was routed). Dropped undecided, it is released in the background.
#[must_use = "commit the admission once routed, or release it"]
pub struct Admission {
    counters: Arc<Counters>,
    held: Vec<(Slot, Placement)>,
    charge: Option<TokenCharge>,
    quotas: UserQuotas,
}

impl Admission {
    /// Where this request was counted, for its trace: `redis`, `local` (in
    /// process, or Redis's in-process backstop), or `none` (no limit applies).
    pub fn store(&self) -> &'static str {
        if self.held.is_empty() {
            "none"
        } else if self.held.iter().any(|(_, placement)| *placement == Placement::Shared) {
            "redis"
        } else {
            "local"
        }
    }

    /// What is left of the user's limits, for the answer's headers.
    pub fn user_quotas(&self) -> UserQuotas {
        self.quotas
    }

    /// Rolls back every counted request; awaited so the very next request
    /// already sees the freed quota.
    pub async fn release(mut self) {
        // One at a time: if this future is dropped half-way, the slots not
        // yet released stay held and `Drop` releases them.
        while let Some((slot, placement)) = self.held.pop() {
            self.counters.release(&slot, placement).await;
        }
    }

    /// Keeps the counted requests; returns the TPM charge to settle when
    /// the response ends (when the user has a TPM limit).
    pub fn commit(mut self) -> Option<TokenCharge> {
        self.held.clear();
        self.charge.take()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.held);
        let counters = Arc::clone(&self.counters);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for (slot, placement) in held {
                    counters.release(&slot, placement).await;
                }
            });
        }
    }
}

/// A boxed future that settles a TPM charge.
pub type Settling = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Bills an answer's tokens to its user's TPM once the response ends.
pub struct TokenCharge {
    counters: Arc<Counters>,
    user: String,
}

impl std::fmt::Debug for TokenCharge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCharge").finish_non_exhaustive()
    }
}

impl TokenCharge {
    /// Charges `tokens`; finishes within the Redis call timeout.
    pub fn settle(self, tokens: u64) -> Settling {
        Box::pin(async move {
            if tokens > 0 {
                self.counters.charge_tokens(&self.user, tokens).await;
            }
        })
    }

    /// Charges `tokens` without waiting (the response is gone already).
    pub fn settle_in_background(self, tokens: u64) {
        if tokens > 0
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(self.settle(tokens));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::errors::GatewayError;
    use crate::limits::local_store::unix_now_ms;

    const MODEL: &str = "llama";

    fn request<'a>(model: &'a Arc<str>, rps_cap: Option<u64>, user: Option<&'a str>) -> LimitRequest<'a> {
        LimitRequest { model, profile: "default", rps_cap, user, stream_usage: StreamUsage::Reported }
    }

    /// Runs `body` until one run stays within one wall-clock window of
    /// `window_ms`, so an in-process limit window does not roll over mid-test.
    async fn within_one_window<F, Fut>(window_ms: u64, mut body: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()>,
    {
        for _ in 0..3 {
            let window = unix_now_ms() / window_ms;
            body().await;
            if unix_now_ms() / window_ms == window {
                return;
            }
        }
        panic!("three runs each crossed a {window_ms} ms window boundary");
    }

    async fn within_one_second<F, Fut>(body: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()>,
    {
        within_one_window(1000, body).await;
    }

    #[tokio::test]
    async fn in_process_rps_cap_admits_exactly_n_and_release_frees_a_slot() {
        within_one_second(|| async {
            let metrics = Arc::new(Metrics::new());
            let limits = Limits::in_process(Arc::clone(&metrics));
            let model: Arc<str> = Arc::from(MODEL);
            let capped = request(&model, Some(2), None);
            let first = limits.admit(&capped).await.expect("first admitted");
            let _second = limits.admit(&capped).await.expect("second admitted");
            let refused = limits.admit(&capped).await.err().expect("third refused");
            assert_eq!(GatewayError::from(refused).to_string(), "model: llama has exceeded RPS: 2");
            first.release().await;
            limits.admit(&capped).await.expect("released slot reused").commit();
            assert!(limits.admit(&request(&model, None, None)).await.is_ok(), "no cap, no limit");
            let text = metrics.render();
            assert!(text.contains(r#"limit="rps",decision="limited"} 1"#), "{text}");
        })
        .await;
    }

    #[tokio::test]
    async fn dropped_admission_is_released_in_the_background() {
        within_one_second(|| async {
            let limits = Limits::in_process(Arc::new(Metrics::new()));
            let model: Arc<str> = Arc::from(MODEL);
            drop(limits.admit(&request(&model, Some(1), None)).await.expect("admitted"));
            tokio::task::yield_now().await;
            limits.admit(&request(&model, Some(1), None)).await.expect("slot came back").commit();
        })
        .await;
    }

    fn users_config(redis_url: Option<String>, failure_mode: FailureMode) -> LimitsConfig {
        LimitsConfig {
            redis_url,
            failure_mode,
            breaker_failures: 2,
            users: vec![UserRecord { name: "alice".into(), rpm: Some(2), tpm: Some(100) }],
            ..LimitsConfig::default()
        }
    }

    #[tokio::test]
    async fn user_rpm_and_tpm_from_the_users_file() {
        let limits = Limits::new(users_config(None, FailureMode::Open), Arc::new(Metrics::new())).expect("limits");
        let model: Arc<str> = Arc::from(MODEL);
        let alice = request(&model, None, Some("alice"));
        let admission = limits.admit(&alice).await.expect("admitted");
        let quotas = admission.user_quotas();
        assert_eq!((quotas.requests.map(|q| (q.limit, q.remaining))), Some((2, 1)), "{quotas:?}");
        assert_eq!((quotas.tokens.map(|q| (q.limit, q.remaining))), Some((100, 100)), "{quotas:?}");
        let charge = admission.commit().expect("alice has a TPM limit");
        charge.settle(100).await;
        let refused = limits.admit(&alice).await.err().expect("over TPM");
        assert_eq!(GatewayError::from(refused).to_string(), "user: alice has exceeded TPM: 100");
        assert!(limits.admit(&request(&model, None, Some("bob"))).await.is_ok(), "unknown user: no default");
        assert!(limits.admit(&request(&model, None, None)).await.is_ok(), "no user header");
    }

    /// A port nothing listens on: every call is refused at once.
    fn dead_redis() -> Option<String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
        Some(format!("redis://127.0.0.1:{port}/"))
    }

    #[tokio::test]
    async fn dead_redis_fails_open_to_the_per_replica_backstop() {
        within_one_second(|| async {
            let metrics = Arc::new(Metrics::new());
            let limits = Limits::new(users_config(dead_redis(), FailureMode::Open), Arc::clone(&metrics)).expect("ok");
            let model: Arc<str> = Arc::from(MODEL);
            let capped = request(&model, Some(1), None);
            limits.admit(&capped).await.expect("fail-open admits").commit();
            let refused = limits.admit(&capped).await.err().expect("backstop enforces the cap");
            assert!(matches!(refused, LimitError::ModelRps { quota: Quota { limit: 1, remaining: 0, .. }, .. }));
            // Two failures opened the circuit: the next check does not even try Redis.
            assert!(limits.admit(&capped).await.is_err());
            let text = metrics.render();
            assert!(text.contains(r#"limit="rps",decision="store_error_allowed"} 1"#), "{text}");
            assert!(text.contains("aibrix_gateway_ratelimit_breaker_state 2"), "breaker open:\n{text}");
            assert!(text.contains(r#"op="admit_window",kind="circuit_open"}"#), "{text}");
        })
        .await;
    }

    #[tokio::test]
    async fn dead_redis_fails_closed_with_503() {
        let metrics = Arc::new(Metrics::new());
        let limits = Limits::new(users_config(dead_redis(), FailureMode::Closed), Arc::clone(&metrics)).expect("ok");
        let model: Arc<str> = Arc::from(MODEL);
        let refused = limits.admit(&request(&model, Some(10), None)).await.err().expect("closed refuses");
        assert!(matches!(refused, LimitError::StoreUnavailable));
        let refused = limits.admit(&request(&model, None, Some("alice"))).await.err().expect("user checks too");
        assert!(matches!(refused, LimitError::StoreUnavailable));
        assert!(limits.admit(&request(&model, None, None)).await.is_ok(), "nothing to check: no store needed");
        assert!(metrics.render().contains(r#"limit="rps",decision="store_error_denied"} 1"#));
    }

    async fn within_one_minute<F, Fut>(body: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()>,
    {
        within_one_window(60_000, body).await;
    }

    fn aibrix_limits(users: Vec<UserRecord>) -> Limits {
        let config = LimitsConfig { users, user_limits: UserLimitsMode::Aibrix, ..LimitsConfig::default() };
        Limits::new(config, Arc::new(Metrics::new())).expect("limits")
    }

    fn wire(err: LimitError) -> (u16, String) {
        let err = GatewayError::from(err);
        (err.status().as_u16(), err.to_string())
    }

    #[tokio::test]
    async fn aibrix_rules_refuse_a_user_without_a_record() {
        let limits = aibrix_limits(vec![UserRecord { name: "alice".into(), rpm: Some(5), tpm: None }]);
        let model: Arc<str> = Arc::from(MODEL);
        let refused = limits.admit(&request(&model, None, Some("mallory"))).await.err().expect("no record");
        assert_eq!(wire(refused), (500, "redis: nil".to_owned()));
        limits.admit(&request(&model, None, Some("alice"))).await.expect("alice has a record").commit();
        limits.admit(&request(&model, None, None)).await.expect("no user header: no user check").commit();
        limits.admit(&request(&model, None, Some(""))).await.expect("empty user header: none").commit();
    }

    #[tokio::test]
    async fn aibrix_rules_default_rpm_100_and_tpm_rpm_times_1000() {
        within_one_minute(|| async {
            let users = vec![
                UserRecord { name: "zero".into(), rpm: Some(0), tpm: Some(0) },
                UserRecord { name: "two".into(), rpm: Some(2), tpm: None },
            ];
            let limits = aibrix_limits(users);
            let model: Arc<str> = Arc::from(MODEL);
            let zero = request(&model, None, Some("zero"));
            for _ in 0..100 {
                limits.admit(&zero).await.expect("100 requests a minute").commit();
            }
            let refused = limits.admit(&zero).await.err().expect("the 101st");
            assert_eq!(wire(refused), (429, "user: zero has exceeded RPM: 100".to_owned()));

            let two = request(&model, None, Some("two"));
            let admission = limits.admit(&two).await.expect("admitted");
            let tokens = admission.user_quotas().tokens.expect("TPM always limited");
            assert_eq!((tokens.limit, tokens.remaining), (2000, 2000), "tpm 0 is rpm x 1000");
            admission.commit().expect("billed: the answer reports usage").settle(2000).await;
            let refused = limits.admit(&two).await.err().expect("TPM used up");
            assert_eq!(wire(refused), (429, "user: two has exceeded TPM: 2000".to_owned()));
            // That TPM refusal counted against RPM, as in AIBrix: 2 of 2 used.
            let refused = limits.admit(&two).await.err().expect("RPM used up");
            assert_eq!(wire(refused), (429, "user: two has exceeded RPM: 2".to_owned()));
        })
        .await;
    }

    #[tokio::test]
    async fn aibrix_rules_require_usage_on_chat_streams_of_users_whose_record_sets_a_tpm() {
        within_one_minute(|| async {
            let users = vec![
                UserRecord { name: "tpm".into(), rpm: Some(3), tpm: Some(50) },
                UserRecord { name: "rpm".into(), rpm: Some(3), tpm: None },
            ];
            let limits = aibrix_limits(users);
            let model: Arc<str> = Arc::from(MODEL);
            let with = |user, stream_usage| LimitRequest { stream_usage, ..request(&model, None, Some(user)) };

            let refused = limits.admit(&with("tpm", StreamUsage::ChatWithout)).await.err().expect("400");
            assert_eq!(wire(refused), (400, "include usage for stream options not set".to_owned()));
            let charge = limits.admit(&with("tpm", StreamUsage::Reported)).await.expect("asks for usage").commit();
            assert!(charge.is_some(), "its usage is billed");
            let charge = limits.admit(&with("tpm", StreamUsage::OtherWithout)).await.expect("not a chat").commit();
            assert!(charge.is_none(), "a completion stream without usage reports none to bill, as in AIBrix");
            let refused = limits.admit(&with("tpm", StreamUsage::Reported)).await.err().expect("RPM used up");
            assert_eq!(wire(refused), (429, "user: tpm has exceeded RPM: 3".to_owned()), "the 400 was counted too");

            let charge = limits.admit(&with("rpm", StreamUsage::ChatWithout)).await.expect("defaulted TPM").commit();
            assert!(charge.is_none(), "nothing billed for a stream the client did not ask usage of");
        })
        .await;
    }

    #[tokio::test]
    async fn aibrix_rules_keep_a_request_counted_when_routing_fails() {
        within_one_minute(|| async {
            let limits = aibrix_limits(vec![UserRecord { name: "alice".into(), rpm: Some(1), tpm: None }]);
            let model: Arc<str> = Arc::from(MODEL);
            let alice = request(&model, None, Some("alice"));
            limits.admit(&alice).await.expect("admitted").release().await;
            assert!(limits.admit(&alice).await.is_err(), "AIBrix gives a user's request back never");
        })
        .await;
    }

    #[tokio::test]
    async fn aibrix_rules_answer_500_when_redis_fails_whatever_the_failure_mode() {
        let users = vec![UserRecord { name: "filed".into(), rpm: Some(5), tpm: None }];
        let config = LimitsConfig {
            user_limits: UserLimitsMode::Aibrix,
            users,
            ..users_config(dead_redis(), FailureMode::Open)
        };
        let limits = Limits::new(config, Arc::new(Metrics::new())).expect("limits");
        let model: Arc<str> = Arc::from(MODEL);
        let refused = limits.admit(&request(&model, None, Some("looked-up"))).await.err().expect("lookup fails");
        assert!(matches!(&refused, LimitError::UserRecord { store_failed: true, .. }), "{refused:?}");
        assert_eq!(wire(refused).0, 500);
        let refused = limits.admit(&request(&model, None, Some("filed"))).await.err().expect("count fails");
        assert_eq!(wire(refused), (500, "fail to get RPM for user: filed".to_owned()));
        limits.admit(&request(&model, Some(5), None)).await.expect("model RPS still fails open").commit();
    }

    #[test]
    fn auth_applies_only_when_configured() {
        let headers = HeaderMap::new();
        let open = Limits::in_process(Arc::new(Metrics::new()));
        assert!(open.authorize(&headers).is_ok());
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let _guard = runtime.enter();
        let config = LimitsConfig { bearer_token: Some("t0ken".into()), ..LimitsConfig::default() };
        let locked = Limits::new(config, Arc::new(Metrics::new())).expect("limits");
        assert!(matches!(locked.authorize(&headers), Err(LimitError::Unauthorized)));
    }

    #[test]
    fn failure_mode_parses() {
        assert_eq!("open".parse::<FailureMode>(), Ok(FailureMode::Open));
        assert_eq!(" Closed ".parse::<FailureMode>(), Ok(FailureMode::Closed));
        assert!("half".parse::<FailureMode>().is_err());
    }
}
