//! `vtc-basic`: virtual token counter fairness across users (header `user`),
//! with AIBrix's formula.
//!
//! Each user's tokens over a sliding window (5 minutes) are counted, prompt
//! tokens weighted 1 and generated tokens 2. Users are spread over the pods
//! by how much they used: with `bucket = max(1000, (least + most used)/2)`
//! over the active users, a user with `t` tokens aims at pod index
//! `min(t / bucket, n - 1)` (pods in their stable order), so heavy users end
//! up apart from light ones. For pod `i`:
//!
//! `score = Wf·|i - target| + Wu·min(running_i / 100, 1) + U(0, 0.1)`
//!
//! with `running_i` the engine's `vllm:num_requests_running`; the lowest
//! wins. The routed request is charged at once with an estimate (prompt
//! bytes / 4, and 1.5 times that generated), corrected with the answer's
//! reported usage when it ends. No `user` header, or a candidate without
//! fresh engine metrics, falls back to least-request.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use lru::LruCache;

use super::{RouteDecision, RouteRequest, RoutingConfig, Strategy, TokenUsage, Unscored, UsageCallback};
use crate::discovery::PodInfo;

/// Users tracked at once; the least recently seen are forgotten beyond this.
const MAX_USERS: usize = 10_000;
/// Longest user name kept as it is; longer ones are counted under a hash.
const MAX_USER_BYTES: usize = 256;
/// Buckets a window is cut into.
const BUCKETS: usize = 10;
/// How often the least and most used user are recomputed.
const EXTREMES_REFRESH: Duration = Duration::from_secs(1);

pub struct VtcBasic {
    tracker: Arc<TokenTracker>,
    fleet: Arc<super::fleet::Link>,
    min_tokens: f64,
    fairness_weight: f64,
    utilization_weight: f64,
    max_pod_load: f64,
    input_weight: f64,
    output_weight: f64,
}

impl VtcBasic {
    /// Counts users' tokens in `tracker`, telling the other replicas each
    /// charge through `fleet`.
    pub fn new(config: &RoutingConfig, tracker: Arc<TokenTracker>, fleet: Arc<super::fleet::Link>) -> Self {
        Self {
            tracker,
            fleet,
            min_tokens: config.vtc_min_tokens.max(1.0),
            fairness_weight: config.vtc_fairness_weight,
            utilization_weight: config.vtc_utilization_weight,
            max_pod_load: config.vtc_max_pod_load.max(1.0),
            input_weight: config.vtc_input_token_weight,
            output_weight: config.vtc_output_token_weight,
        }
    }

    fn charge(&self, prompt_tokens: f64, completion_tokens: f64) -> f64 {
        prompt_tokens * self.input_weight + completion_tokens * self.output_weight
    }
}

impl Strategy for VtcBasic {
    fn name(&self) -> &'static str {
        "vtc-basic"
    }

    fn score(
        &self,
        request: &RouteRequest<'_>,
        candidates: &[Arc<PodInfo>],
        scores: &mut Vec<f64>,
    ) -> Result<(), Unscored> {
        let user = request.user.ok_or(Unscored::NoUser)?;
        let running = candidates
            .iter()
            .map(|pod| request.pod_metrics(pod).and_then(|m| m.running.ok_or(Unscored::MetricsMissing)))
            .collect::<Result<Vec<f64>, _>>()?;
        let now = Instant::now();
        let tokens = self.tracker.tokens(user, now);
        let (least, most) = self.tracker.extremes(now);
        let bucket = self.min_tokens.max((least + most) / 2.0);
        let last = candidates.len().saturating_sub(1) as f64;
        let target = (tokens / bucket).min(last);
        scores.clear();
        scores.extend(running.iter().enumerate().map(|(i, running)| {
            let fairness = (i as f64 - target).abs();
            let utilization = (running / self.max_pod_load).min(1.0);
            self.fairness_weight * fairness + self.utilization_weight * utilization + rand::random::<f64>() * 0.1
        }));
        Ok(())
    }

    fn chosen(&self, request: &RouteRequest<'_>, _pod: &PodInfo, decision: &mut RouteDecision) {
        let Some(user) = request.user else { return };
        let prompt_tokens = (request.prompt().len() as f64 / 4.0).ceil();
        let estimate = self.charge(prompt_tokens, (prompt_tokens * 1.5).ceil());
        let user = TokenTracker::key(user).into_owned();
        self.tracker.add(&user, estimate, Instant::now());
        self.fleet.send(super::fleet::Event::Tokens { user: user.clone(), tokens: estimate });
        let tracker = Arc::clone(&self.tracker);
        let fleet = Arc::clone(&self.fleet);
        let (input_weight, output_weight) = (self.input_weight, self.output_weight);
        decision.on_usage = Some(UsageCallback::new(move |usage: Option<TokenUsage>| {
            if let Some(usage) = usage {
                let actual = usage.prompt_tokens as f64 * input_weight + usage.completion_tokens as f64 * output_weight;
                let correction = actual - estimate;
                tracker.add(&user, correction, Instant::now());
                fleet.send(super::fleet::Event::Tokens { user, tokens: correction });
            }
        }));
    }
}

/// Per-user token counts over a sliding window of [`BUCKETS`] buckets:
/// this replica's charges and, with Redis, every other replica's.
pub struct TokenTracker {
    started: Instant,
    bucket_length: Duration,
    users: Mutex<LruCache<String, [(u64, f64); BUCKETS]>>,
    /// (computed at, least, most) over the active users.
    extremes: Mutex<Option<(Instant, f64, f64)>>,
}

impl std::fmt::Debug for TokenTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenTracker").field("window", &self.window()).finish_non_exhaustive()
    }
}

impl TokenTracker {
    pub fn new(window: Duration) -> Self {
        let bucket_length = (window / BUCKETS as u32).max(Duration::from_millis(1));
        let capacity = NonZeroUsize::new(MAX_USERS).unwrap_or(NonZeroUsize::MIN);
        let now = Instant::now();
        Self {
            // A window before now, so that charges other replicas made
            // before this one started land in their own buckets.
            started: now.checked_sub(window).unwrap_or(now),
            bucket_length,
            users: Mutex::new(LruCache::new(capacity)),
            extremes: Mutex::new(None),
        }
    }

    fn slot(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.started).as_nanos();
        u64::try_from(elapsed / self.bucket_length.as_nanos().max(1)).unwrap_or(u64::MAX)
    }

    fn sum(buckets: &[(u64, f64); BUCKETS], slot: u64) -> f64 {
        let oldest = slot.saturating_sub(BUCKETS as u64 - 1);
        buckets.iter().filter(|(s, _)| *s >= oldest && *s <= slot).map(|(_, t)| t).sum::<f64>().max(0.0)
    }

    /// The window counts are kept over.
    pub fn window(&self) -> Duration {
        self.bucket_length.saturating_mul(BUCKETS as u32)
    }

    /// The name a user is counted under: the `user` header itself, or for
    /// a name longer than [`MAX_USER_BYTES`] a hash of it, so that what is
    /// kept and shared with other replicas per user stays small.
    pub fn key(user: &str) -> std::borrow::Cow<'_, str> {
        if user.len() <= MAX_USER_BYTES {
            std::borrow::Cow::Borrowed(user)
        } else {
            std::borrow::Cow::Owned(format!("#{:016x}", xxhash_rust::xxh64::xxh64(user.as_bytes(), 0)))
        }
    }

    /// Adds `tokens` (negative to correct an estimate) to the user's bucket
    /// of `now`; a charge older than the window is dropped.
    pub fn add(&self, user: &str, tokens: f64, now: Instant) {
        let user = &*Self::key(user);
        let slot = self.slot(now);
        let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        if !users.contains(user) {
            users.put(user.to_owned(), [(0, 0.0); BUCKETS]);
        }
        if let Some(buckets) = users.get_mut(user) {
            let bucket = &mut buckets[(slot % BUCKETS as u64) as usize];
            if bucket.0 > slot {
                // A late charge whose bucket has been reused by a newer one.
                return;
            }
            if bucket.0 != slot {
                *bucket = (slot, 0.0);
            }
            bucket.1 += tokens;
        }
    }

    /// The user's tokens within the window.
    pub(crate) fn tokens(&self, user: &str, now: Instant) -> f64 {
        let user = &*Self::key(user);
        let slot = self.slot(now);
        let users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        users.peek(user).map_or(0.0, |buckets| Self::sum(buckets, slot))
    }

    /// The least and the most tokens of any user active within the window,
    /// recomputed at most every second (it walks every user).
    fn extremes(&self, now: Instant) -> (f64, f64) {
        let mut cached = self.extremes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, least, most)) = *cached
            && now.saturating_duration_since(at) < EXTREMES_REFRESH
        {
            return (least, most);
        }
        let slot = self.slot(now);
        let users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        let (least, most) = users
            .iter()
            .map(|(_, buckets)| Self::sum(buckets, slot))
            .filter(|t| *t > 0.0)
            .fold((f64::INFINITY, 0.0_f64), |(lo, hi), t| (lo.min(t), hi.max(t)));
        let least = if least.is_finite() { least } else { 0.0 };
        *cached = Some((now, least, most));
        (least, most)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::test_support::*;

    fn vtc(config: &RoutingConfig) -> VtcBasic {
        let tracker = Arc::new(TokenTracker::new(config.vtc_window()));
        VtcBasic::new(config, tracker, Arc::default())
    }

    fn running(n: f64) -> Option<crate::engine_metrics::PodMetrics> {
        Some(fresh(|m| m.running = Some(n)))
    }

    fn with_user<'a>(model: &'a Arc<str>, body: &'a [u8], user: &'a str) -> RouteRequest<'a> {
        let mut request = RouteRequest::new(model, body).with_metrics(view(vec![running(0.0); 4]));
        request.user = Some(user);
        request
    }

    #[test]
    fn light_users_go_to_low_pods_heavy_users_to_high_ones() {
        let vtc = vtc(&RoutingConfig::default());
        let pods = pods(4);
        let model = model();
        let now = Instant::now();
        vtc.tracker.add("heavy", 2500.0, now);
        vtc.tracker.add("light", 10.0, now);
        // bucket = max(1000, (10 + 2500)/2) = 1255: heavy aims at 1.99, light at 0.
        assert_eq!(vtc.pick(&with_user(&model, b"{}", "light"), &pods), Ok(0));
        assert_eq!(vtc.pick(&with_user(&model, b"{}", "heavy"), &pods), Ok(2));
        assert_eq!(vtc.pick(&with_user(&model, b"{}", "new"), &pods), Ok(0));
    }

    #[test]
    fn a_saturated_pod_is_avoided() {
        let vtc = vtc(&RoutingConfig { vtc_fairness_weight: 0.1, ..RoutingConfig::default() });
        let pods = pods(2);
        let model = model();
        let mut request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![running(100.0), running(0.0)]));
        request.user = Some("u");
        // Fairness prefers pod 0 by 0.1; utilisation costs it 0.5.
        for _ in 0..20 {
            assert_eq!(vtc.pick(&request, &pods), Ok(1));
        }
    }

    #[test]
    fn charges_an_estimate_then_the_reported_usage() {
        let vtc = vtc(&RoutingConfig::default());
        let pods = pods(4);
        let model = model();
        let prompt = "x".repeat(400);
        let request = with_user(&model, prompt.as_bytes(), "alice");
        let mut decision = RouteDecision::default();
        vtc.chosen(&request, &pods[0], &mut decision);
        // 100 prompt tokens, 150 generated: 100 + 2·150.
        assert_eq!(vtc.tracker.tokens("alice", Instant::now()), 400.0);
        decision.on_usage.expect("a callback").call(Some(TokenUsage { prompt_tokens: 90, completion_tokens: 10 }));
        assert_eq!(vtc.tracker.tokens("alice", Instant::now()), 110.0);
        let mut decision = RouteDecision::default();
        vtc.chosen(&request, &pods[0], &mut decision);
        decision.on_usage.expect("a callback").call(None);
        assert_eq!(vtc.tracker.tokens("alice", Instant::now()), 510.0, "no usage: the estimate stands");
    }

    #[test]
    fn a_long_user_name_is_counted_under_a_short_key() {
        let tracker = TokenTracker::new(Duration::from_secs(10));
        let long = "u".repeat(10_000);
        tracker.add(&long, 5.0, Instant::now());
        assert_eq!(tracker.tokens(&long, Instant::now()), 5.0);
        let key = TokenTracker::key(&long);
        assert!(key.len() <= 17, "{key}");
        assert_eq!(tracker.tokens(&key, Instant::now()), 5.0, "the key is what other replicas are told");
        assert_eq!(TokenTracker::key("alice"), "alice");
    }

    #[test]
    fn tokens_leave_the_window() {
        let tracker = TokenTracker::new(Duration::from_secs(10));
        let t0 = tracker.started;
        tracker.add("u", 50.0, t0);
        tracker.add("u", 25.0, t0 + Duration::from_secs(5));
        assert_eq!(tracker.tokens("u", t0 + Duration::from_secs(9)), 75.0);
        assert_eq!(tracker.tokens("u", t0 + Duration::from_secs(11)), 25.0);
        assert_eq!(tracker.tokens("u", t0 + Duration::from_secs(30)), 0.0);
        assert_eq!(tracker.extremes(t0 + Duration::from_secs(9)), (75.0, 75.0));
    }

    #[test]
    fn no_user_or_no_metrics_falls_back() {
        let vtc = vtc(&RoutingConfig::default());
        let pods = pods(2);
        let model = model();
        assert_eq!(vtc.pick(&RouteRequest::new(&model, b"{}"), &pods), Err(Unscored::NoUser));
        let mut missing = RouteRequest::new(&model, b"{}").with_metrics(view(vec![running(0.0), None]));
        missing.user = Some("u");
        assert_eq!(vtc.pick(&missing, &pods), Err(Unscored::MetricsMissing));
        let mut stale = RouteRequest::new(&model, b"{}")
            .with_metrics(view(vec![running(0.0), Some(stale(|m| m.running = Some(0.0)))]));
        stale.user = Some("u");
        assert_eq!(vtc.pick(&stale, &pods), Err(Unscored::MetricsStale));
    }

    #[test]
    fn single_pod() {
        let vtc = vtc(&RoutingConfig::default());
        let pods = pods(1);
        let model = model();
        vtc.tracker.add("heavy", 1e9, Instant::now());
        let mut request = RouteRequest::new(&model, b"{}").with_metrics(view(vec![running(5.0)]));
        request.user = Some("heavy");
        assert_eq!(vtc.pick(&request, &pods), Ok(0));
    }
}
