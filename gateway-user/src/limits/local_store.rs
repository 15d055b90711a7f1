//! In-process counters: the limiter of a gateway run without Redis (per
//! replica, as the seed says), and the backstop while Redis is unreachable.
//!
//! Windows come from the wall clock: 1-second windows for model RPS, minute
//! windows for user RPM/TPM.
//!
//! Each request costs the same however many users are counted (issue 22: a
//! single map, rescanned on every new key past 10,000 entries, fell from 8,000
//! to 1,400 requests/s at 100k users):
//!
//! * keys are spread over [`SHARDS`] shards by a hash, each behind its own
//!   lock, so requests of different users seldom wait for one another;
//! * a shard keeps one map per window (a generation), so a window expires by
//!   dropping its map whole, never by visiting its entries. The first request
//!   of a new window moves the expired generations out of every shard (one
//!   short lock each, once per window) and large ones are freed on a helper
//!   thread.
//!
//! Memory is bounded by the keys counted in the current and the previous window.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::quota::Quota;
use super::{
    CounterStore, Slot, StoreError, UserCheck, UserLimitsMode, UserVerdict, WindowVerdict, rpm_counter_key,
    tpm_counter_key,
};

/// Independent locks. A gateway runs one worker thread per core; with 64
/// shards two requests of different users meet on a lock rarely even on a
/// large machine, and 64 empty shards cost a few kilobytes.
const SHARDS: usize = 64;
/// Expired windows holding more entries than this are swept (freed) on a
/// helper thread: freeing a million keys takes tens of milliseconds, which no
/// request should wait for.
const SWEEP_ABOVE_ENTRIES: usize = 10_000;
/// Length of a model RPS window, ms.
const SECOND_MS: u64 = 1000;
/// Length of a user RPM/TPM window, ms.
const MINUTE_MS: u64 = 60_000;

/// In-process fixed-window counters.
pub struct LocalStore {
    shards: Box<[Mutex<Shard>]>,
    /// Seeded per process: keys come from the `user` header, and a client
    /// that could predict the shard of its names could pile them on one lock.
    hasher: RandomState,
    seconds: Clock,
    minutes: Clock,
}

/// A window length and the newest window of that length any request has been in.
#[derive(Debug)]
struct Clock {
    length_ms: u64,
    newest: AtomicU64,
}

/// The counters of one window in one shard.
#[derive(Debug)]
struct Generation {
    length_ms: u64,
    /// Window number: unix second for RPS, unix minute for RPM/TPM.
    id: u64,
    counts: HashMap<String, u64>,
}

impl Generation {
    /// Unix time (ms) from which the generation is dropped: the end of the
    /// window after its own. A request that read the clock just before its
    /// window ended can reach the lock after the next window began, and must
    /// still find its window's counts rather than start again from zero.
    fn expires_ms(&self) -> u64 {
        (self.id + 2) * self.length_ms
    }
}

/// One lock's share of the counters.
#[derive(Debug, Default)]
struct Shard {
    /// The current and the previous window of each length (and any window a
    /// late request started since the last sweep): a handful, scanned in order.
    generations: Vec<Generation>,
}

impl Shard {
    fn count(&self, length_ms: u64, id: u64, key: &str) -> u64 {
        self.generations
            .iter()
            .find(|g| g.length_ms == length_ms && g.id == id)
            .and_then(|g| g.counts.get(key))
            .copied()
            .unwrap_or(0)
    }

    fn add(&mut self, length_ms: u64, id: u64, key: &str, amount: u64) {
        let index = match self.generations.iter().position(|g| g.length_ms == length_ms && g.id == id) {
            Some(index) => index,
            None => {
                // Sized like the newest window of the same length: the same
                // users tend to come back, and growing a map of 100k keys
                // step by step rehashes it on the request path.
                let expected = self
                    .generations
                    .iter()
                    .filter(|g| g.length_ms == length_ms)
                    .max_by_key(|g| g.id)
                    .map_or(0, |g| g.counts.len());
                self.generations.push(Generation { length_ms, id, counts: HashMap::with_capacity(expected) });
                self.generations.len() - 1
            }
        };
        let counts = &mut self.generations[index].counts;
        // Looked up before inserting so that known keys, most requests, copy no string.
        match counts.get_mut(key) {
            Some(count) => *count = count.saturating_add(amount),
            None => {
                counts.insert(key.to_owned(), amount);
            }
        }
    }

    fn release(&mut self, id: u64, key: &str) {
        // A slot names its window but not the window's length. Second and
        // minute numbers are far apart and RPS and user keys never coincide,
        // so at most one generation holds the pair.
        let count = self.generations.iter_mut().filter(|g| g.id == id).find_map(|g| g.counts.get_mut(key));
        if let Some(count) = count {
            *count = count.saturating_sub(1);
        }
    }

    fn take_expired(&mut self, now_ms: u64, expired: &mut Vec<Generation>) {
        expired.extend(self.generations.extract_if(.., |g| g.expires_ms() <= now_ms));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.generations.iter().map(|g| g.counts.len()).sum()
    }
}

/// Wall-clock Unix time in milliseconds.
pub(super) fn unix_now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The window of length `length_ms` that `now_ms` falls in, and the time left in it.
fn window_at(now_ms: u64, length_ms: u64) -> (u64, Duration) {
    (now_ms / length_ms, Duration::from_millis(length_ms - now_ms % length_ms))
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Frees expired generations, off the request path when they are large.
fn sweep(expired: Vec<Generation>) {
    let entries: usize = expired.iter().map(|g| g.counts.len()).sum();
    if entries > SWEEP_ABOVE_ENTRIES {
        // When no thread can be started, the closure, maps included, is
        // dropped right here: slower, never lost.
        let _ = std::thread::Builder::new().name("local-store-sweep".into()).spawn(move || drop(expired));
    }
}

impl Default for LocalStore {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            seconds: Clock { length_ms: SECOND_MS, newest: AtomicU64::new(0) },
            minutes: Clock { length_ms: MINUTE_MS, newest: AtomicU64::new(0) },
        }
    }
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The counters themselves would be one line per active user.
        f.debug_struct("LocalStore").field("shards", &self.shards.len()).finish_non_exhaustive()
    }
}

impl LocalStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// The locked shard that holds `key`.
    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        let index = self.hasher.hash_one(key) % SHARDS as u64;
        lock(&self.shards[index as usize])
    }

    /// Notes a request at `now_ms` in a window of `clock`. The first request of
    /// a new window takes the generations expired by then out of every shard:
    /// 64 short locks once per window, however many keys there are.
    fn enter_window(&self, clock: &Clock, now_ms: u64) {
        let id = now_ms / clock.length_ms;
        // The plain load keeps the common case (window already entered) a read
        // of a shared cache line rather than a write from every core.
        if clock.newest.load(Ordering::Relaxed) >= id || clock.newest.fetch_max(id, Ordering::Relaxed) >= id {
            return;
        }
        let mut expired = Vec::new();
        for shard in &self.shards {
            lock(shard).take_expired(now_ms, &mut expired);
        }
        sweep(expired);
    }

    /// Counts one request in the 1-second window of `now_ms` unless `limit`
    /// are counted there already.
    pub fn admit_window_at(&self, key: &str, limit: u64, now_ms: u64) -> WindowVerdict {
        let (second, reset) = window_at(now_ms, SECOND_MS);
        self.enter_window(&self.seconds, now_ms);
        let mut shard = self.shard(key);
        let count = shard.count(SECOND_MS, second, key);
        if count >= limit {
            return WindowVerdict::Limited { quota: Quota { limit, remaining: 0, reset } };
        }
        shard.add(SECOND_MS, second, key, 1);
        WindowVerdict::Admitted {
            slot: Slot { key: key.to_owned(), window: second },
            quota: Quota { limit, remaining: limit - count - 1, reset },
        }
    }

    /// Checks the user's RPM and TPM in the minute of `now_ms` and counts the
    /// request against RPM when both allow it; under AIBrix's rules, when RPM
    /// allows it (the TPM check comes after the count, as in AIBrix).
    pub fn admit_user_at(&self, check: &UserCheck<'_>, now_ms: u64) -> UserVerdict {
        let (minute, reset) = window_at(now_ms, MINUTE_MS);
        self.enter_window(&self.minutes, now_ms);
        let limits = check.limits;
        let rpm_key = rpm_counter_key(check.user);
        // Both counters of a user live in the shard of the RPM key, so the
        // check of both and the count are one step under one lock.
        let mut shard = self.shard(&rpm_key);
        let requests = shard.count(MINUTE_MS, minute, &rpm_key);
        let tokens = shard.count(MINUTE_MS, minute, &tpm_counter_key(check.user));
        if let Some(limit) = limits.rpm
            && requests >= limit
        {
            return UserVerdict::RpmExceeded { quota: Quota { limit, remaining: 0, reset } };
        }
        let mut count = || {
            limits.rpm.map(|_| {
                shard.add(MINUTE_MS, minute, &rpm_key, 1);
                Slot { key: rpm_key.clone(), window: minute }
            })
        };
        let counted_first = match check.mode {
            UserLimitsMode::Aibrix => Some(count()),
            UserLimitsMode::Turnstile => None,
        };
        if let Some(limit) = limits.tpm
            && tokens >= limit
        {
            return UserVerdict::TpmExceeded { quota: Quota { limit, remaining: 0, reset } };
        }
        let rpm_slot = counted_first.unwrap_or_else(count);
        UserVerdict::Admitted {
            limits,
            rpm_slot,
            requests: limits.rpm.map(|limit| Quota { limit, remaining: limit - requests - 1, reset }),
            tokens: limits.tpm.map(|limit| Quota { limit, remaining: limit.saturating_sub(tokens), reset }),
            record_tpm: check.record_tpm,
        }
    }

    /// Takes back one request counted in `slot`'s window (a no-op once the
    /// window has passed).
    pub fn release_now(&self, slot: &Slot) {
        self.shard(&slot.key).release(slot.window, &slot.key);
    }

    /// Adds `tokens` to the user's TPM counter of the minute of `now_ms`.
    pub fn charge_tokens_at(&self, user: &str, tokens: u64, now_ms: u64) {
        let (minute, _) = window_at(now_ms, MINUTE_MS);
        self.enter_window(&self.minutes, now_ms);
        self.shard(&rpm_counter_key(user)).add(MINUTE_MS, minute, &tpm_counter_key(user), tokens);
    }

    /// Counters held, over every window and shard.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).len()).sum()
    }
}

impl CounterStore for LocalStore {
    fn admit_window(&self, key: &str, limit: u64) -> impl Future<Output = Result<WindowVerdict, StoreError>> + Send {
        std::future::ready(Ok(self.admit_window_at(key, limit, unix_now_ms())))
    }

    fn admit_user(&self, check: &UserCheck<'_>) -> impl Future<Output = Result<UserVerdict, StoreError>> + Send {
        std::future::ready(Ok(self.admit_user_at(check, unix_now_ms())))
    }

    fn release(&self, slot: &Slot) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.release_now(slot);
        std::future::ready(Ok(()))
    }

    fn charge_tokens(&self, user: &str, tokens: u64) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.charge_tokens_at(user, tokens, unix_now_ms());
        std::future::ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::UserLimits;

    /// A minute boundary, in ms.
    const T0: u64 = 1_700_000_040_000;
    const S: u64 = 1000;

    fn admitted(v: &WindowVerdict) -> bool {
        matches!(v, WindowVerdict::Admitted { .. })
    }

    #[test]
    fn exactly_limit_admitted_per_second_window() {
        let store = LocalStore::new();
        let got: Vec<bool> = (0..8).map(|_| admitted(&store.admit_window_at("m", 5, T0))).collect();
        assert_eq!(got, [true, true, true, true, true, false, false, false]);
        assert!(admitted(&store.admit_window_at("m", 5, T0 + S)), "next second is a fresh window");
        assert!(admitted(&store.admit_window_at("other", 5, T0)), "keys count separately");
    }

    #[test]
    fn window_quota_counts_down_and_resets_with_the_second() {
        let store = LocalStore::new();
        let quota = |v: WindowVerdict| match v {
            WindowVerdict::Admitted { quota, .. } | WindowVerdict::Limited { quota } => quota,
        };
        let first = quota(store.admit_window_at("m", 2, T0 + 250));
        assert_eq!(first, Quota { limit: 2, remaining: 1, reset: Duration::from_millis(750) });
        assert_eq!(quota(store.admit_window_at("m", 2, T0 + 900)).remaining, 0);
        let refused = store.admit_window_at("m", 2, T0 + 999);
        assert_eq!(
            refused,
            WindowVerdict::Limited { quota: Quota { limit: 2, remaining: 0, reset: Duration::from_millis(1) } }
        );
    }

    #[test]
    fn release_gives_the_slot_back_in_its_own_window_only() {
        let store = LocalStore::new();
        let WindowVerdict::Admitted { slot, .. } = store.admit_window_at("m", 1, T0) else { panic!("admitted") };
        assert!(!admitted(&store.admit_window_at("m", 1, T0)));
        store.release_now(&slot);
        assert!(admitted(&store.admit_window_at("m", 1, T0)), "released slot is free again");

        let WindowVerdict::Admitted { slot: old, .. } = store.admit_window_at("m", 1, T0 + S) else {
            panic!("admitted")
        };
        assert!(admitted(&store.admit_window_at("m", 2, T0 + 2 * S)));
        store.release_now(&old);
        assert!(admitted(&store.admit_window_at("m", 2, T0 + 2 * S)));
        assert!(!admitted(&store.admit_window_at("m", 2, T0 + 2 * S)), "stale release did not free a new slot");
    }

    fn check(user: &str, rpm: Option<u64>, tpm: Option<u64>) -> UserCheck<'_> {
        UserCheck {
            user,
            limits: UserLimits { rpm, tpm },
            lookup_record: false,
            mode: UserLimitsMode::Turnstile,
            record_tpm: false,
        }
    }

    #[test]
    fn rpm_counts_requests_per_minute() {
        let store = LocalStore::new();
        let c = check("alice", Some(2), None);
        assert!(matches!(store.admit_user_at(&c, T0), UserVerdict::Admitted { rpm_slot: Some(_), .. }));
        assert!(matches!(store.admit_user_at(&c, T0 + 30 * S), UserVerdict::Admitted { .. }));
        let refused = store.admit_user_at(&c, T0 + 59 * S);
        let quota = Quota { limit: 2, remaining: 0, reset: Duration::from_secs(1) };
        assert_eq!(refused, UserVerdict::RpmExceeded { quota });
        assert!(matches!(store.admit_user_at(&c, T0 + 60 * S), UserVerdict::Admitted { .. }), "new minute");
    }

    #[test]
    fn tpm_is_checked_against_charged_tokens() {
        let store = LocalStore::new();
        let c = check("bob", None, Some(100));
        assert!(matches!(store.admit_user_at(&c, T0), UserVerdict::Admitted { rpm_slot: None, .. }));
        store.charge_tokens_at("bob", 99, T0 + S);
        assert!(matches!(store.admit_user_at(&c, T0 + 2 * S), UserVerdict::Admitted { .. }));
        store.charge_tokens_at("bob", 1, T0 + 3 * S);
        let refused = store.admit_user_at(&c, T0 + 4 * S);
        let quota = Quota { limit: 100, remaining: 0, reset: Duration::from_secs(56) };
        assert_eq!(refused, UserVerdict::TpmExceeded { quota });
        assert!(matches!(store.admit_user_at(&c, T0 + 60 * S), UserVerdict::Admitted { .. }));
    }

    #[test]
    fn admitted_users_learn_what_is_left_of_both_limits() {
        let store = LocalStore::new();
        let c = check("dana", Some(10), Some(1000));
        store.charge_tokens_at("dana", 300, T0);
        store.admit_user_at(&c, T0 + S);
        let UserVerdict::Admitted { requests, tokens, .. } = store.admit_user_at(&c, T0 + 20 * S) else {
            panic!("admitted")
        };
        let reset = Duration::from_secs(40);
        assert_eq!(requests, Some(Quota { limit: 10, remaining: 8, reset }), "two requests counted");
        assert_eq!(tokens, Some(Quota { limit: 1000, remaining: 700, reset }));
    }

    #[test]
    fn refused_requests_are_not_counted() {
        let store = LocalStore::new();
        let both = check("carol", Some(1), Some(10));
        store.charge_tokens_at("carol", 10, T0);
        assert!(matches!(store.admit_user_at(&both, T0), UserVerdict::TpmExceeded { .. }));
        let rpm_only = check("carol", Some(1), None);
        assert!(matches!(store.admit_user_at(&rpm_only, T0), UserVerdict::Admitted { .. }), "TPM refusal took no RPM");
    }

    /// AIBrix counts the request against RPM before it checks TPM, and never
    /// takes it back: a TPM refusal still uses up a request of the minute.
    #[test]
    fn aibrix_rules_count_a_tpm_refusal_against_rpm() {
        let store = LocalStore::new();
        let aibrix = UserCheck { mode: UserLimitsMode::Aibrix, record_tpm: true, ..check("erin", Some(3), Some(10)) };
        let UserVerdict::Admitted { record_tpm, requests, .. } = store.admit_user_at(&aibrix, T0) else {
            panic!("admitted")
        };
        assert!(record_tpm, "the check's record TPM is handed back");
        assert_eq!(requests.map(|q| q.remaining), Some(2));
        store.charge_tokens_at("erin", 10, T0 + S);
        assert!(matches!(store.admit_user_at(&aibrix, T0 + 2 * S), UserVerdict::TpmExceeded { .. }));
        assert!(matches!(store.admit_user_at(&aibrix, T0 + 3 * S), UserVerdict::TpmExceeded { .. }));
        let quota = Quota { limit: 3, remaining: 0, reset: Duration::from_secs(56) };
        assert_eq!(
            store.admit_user_at(&aibrix, T0 + 4 * S),
            UserVerdict::RpmExceeded { quota },
            "the two TPM refusals were counted: 3 requests"
        );
        let turnstile = check("erin", Some(4), None);
        assert!(matches!(store.admit_user_at(&turnstile, T0 + 5 * S), UserVerdict::Admitted { .. }));
        assert!(
            matches!(store.admit_user_at(&turnstile, T0 + 5 * S), UserVerdict::RpmExceeded { .. }),
            "same counter under both rules"
        );
    }

    #[test]
    fn expired_windows_are_swept_when_the_map_grows() {
        let store = LocalStore::new();
        for i in 0..SWEEP_ABOVE_ENTRIES {
            store.admit_window_at(&format!("k{i}"), 1, T0);
        }
        assert_eq!(store.len(), SWEEP_ABOVE_ENTRIES);
        store.admit_window_at("fresh", 1, T0 + 10 * S);
        assert_eq!(store.len(), 1, "only the live window is left");
    }

    #[test]
    fn a_late_request_still_counts_in_its_own_window() {
        let store = LocalStore::new();
        assert!(admitted(&store.admit_window_at("m", 1, T0 + 999)));
        // Another request started the next second, sweeping on its way...
        assert!(admitted(&store.admit_window_at("m", 1, T0 + S)));
        // ...before one that read the clock in the first second got the lock.
        assert!(!admitted(&store.admit_window_at("m", 1, T0 + 998)), "the first second is still full");
    }

    /// A million users over two minutes, then a thousand. Expiry drops whole
    /// windows when a new one starts, so memory follows the active users. The
    /// single map this replaced rescanned itself on every new user past 10,000:
    /// some 10^11 entry visits for this test.
    #[test]
    fn a_million_users_leave_with_their_windows() {
        const HALF: u64 = 500_000;
        const ACTIVE: u64 = 1000;
        let store = LocalStore::new();
        let admit = |user: String, now_ms: u64| {
            let verdict = store.admit_user_at(&check(&user, Some(10), None), now_ms);
            assert!(matches!(verdict, UserVerdict::Admitted { rpm_slot: Some(_), .. }), "{user}: {verdict:?}");
        };
        for i in 0..HALF {
            admit(format!("a{i}"), T0 + i % MINUTE_MS);
        }
        for i in 0..HALF {
            admit(format!("b{i}"), T0 + MINUTE_MS + i % MINUTE_MS);
        }
        assert_eq!(store.len(), 2 * HALF as usize, "the previous minute is kept while the next one runs");

        for i in 0..ACTIVE {
            admit(format!("a{i}"), T0 + 2 * MINUTE_MS + i);
        }
        assert_eq!(store.len(), (HALF + ACTIVE) as usize, "minute 0 went as minute 2 began");
        for i in 0..ACTIVE {
            admit(format!("a{i}"), T0 + 3 * MINUTE_MS + i);
        }
        assert_eq!(store.len(), 2 * ACTIVE as usize, "only the last two minutes of the active users are left");

        store.charge_tokens_at("a0", 1, T0 + 10 * MINUTE_MS);
        assert_eq!(store.len(), 1, "a TPM charge sweeps too");
    }

    #[test]
    fn counts_stay_exact_under_concurrent_requests() {
        const THREADS: u64 = 8;
        const ATTEMPTS: u64 = 1024;
        const USERS: u64 = 16;
        const LIMIT: u64 = 5000;
        const UNLIMITED: u64 = 1_000_000;
        let store = LocalStore::new();
        let admitted_total: u64 = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..THREADS)
                .map(|_| {
                    scope.spawn(|| {
                        let mut admitted_here = 0;
                        for i in 0..ATTEMPTS {
                            admitted_here += u64::from(admitted(&store.admit_window_at("m", LIMIT, T0)));
                            let user = format!("u{}", i % USERS);
                            store.admit_user_at(&check(&user, Some(UNLIMITED), None), T0 + S);
                            store.charge_tokens_at(&user, 3, T0 + 2 * S);
                            // Admitted, then released: nets to zero.
                            if let UserVerdict::Admitted { rpm_slot: Some(slot), .. } =
                                store.admit_user_at(&check("shared", Some(UNLIMITED), None), T0 + 3 * S)
                            {
                                store.release_now(&slot);
                            }
                        }
                        admitted_here
                    })
                })
                .collect();
            threads.into_iter().map(|thread| thread.join().unwrap()).sum()
        });
        assert_eq!(admitted_total, LIMIT, "{} attempts, exactly the limit admitted", THREADS * ATTEMPTS);

        let per_user = THREADS * ATTEMPTS / USERS;
        for user in (0..USERS).map(|u| format!("u{u}")).chain(["shared".into()]) {
            let counted = if user == "shared" { 0 } else { per_user };
            let verdict = store.admit_user_at(&check(&user, Some(UNLIMITED), Some(UNLIMITED)), T0 + 4 * S);
            let UserVerdict::Admitted { requests: Some(requests), tokens: Some(tokens), .. } = verdict else {
                panic!("{user}: {verdict:?}")
            };
            assert_eq!(UNLIMITED - requests.remaining - 1, counted, "{user}: requests");
            assert_eq!(UNLIMITED - tokens.remaining, 3 * counted, "{user}: tokens");
        }
    }
}
