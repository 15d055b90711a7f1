//! In-process counters: the limiter of a gateway run without Redis (per
//! replica, as the seed says), and the backstop while Redis is unreachable.
//!
//! Windows come from the wall clock: 1-second windows for model RPS, minute
//! windows for user RPM/TPM. Each key keeps only its current window, so the
//! map holds one entry per model profile and active user.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::quota::Quota;
use super::{CounterStore, Slot, StoreError, UserCheck, UserVerdict, WindowVerdict, rpm_counter_key, tpm_counter_key};

/// Entries kept before expired windows are swept out.
const SWEEP_ABOVE_ENTRIES: usize = 10_000;
/// Length of a model RPS window, ms.
const SECOND_MS: u64 = 1000;
/// Length of a user RPM/TPM window, ms.
const MINUTE_MS: u64 = 60_000;

#[derive(Debug, Clone, Copy)]
struct Window {
    /// Window number: unix second for RPS, unix minute for RPM/TPM.
    id: u64,
    count: u64,
    /// Unix time (ms) after which the entry is useless.
    expires_ms: u64,
}

/// In-process fixed-window counters.
#[derive(Debug, Default)]
pub struct LocalStore {
    windows: Mutex<HashMap<String, Window>>,
}

/// Wall-clock Unix time in milliseconds.
pub(super) fn unix_now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The window of length `length_ms` that `now_ms` falls in, and the time left in it.
fn window_at(now_ms: u64, length_ms: u64) -> (u64, Duration) {
    (now_ms / length_ms, Duration::from_millis(length_ms - now_ms % length_ms))
}

impl LocalStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Window>> {
        self.windows.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn count(windows: &HashMap<String, Window>, key: &str, id: u64) -> u64 {
        windows.get(key).filter(|w| w.id == id).map_or(0, |w| w.count)
    }

    fn add(windows: &mut HashMap<String, Window>, key: &str, id: u64, amount: u64, expires_ms: u64, now_ms: u64) {
        if windows.len() >= SWEEP_ABOVE_ENTRIES && !windows.contains_key(key) {
            windows.retain(|_, w| w.expires_ms > now_ms);
        }
        let window = windows.entry(key.to_owned()).or_insert(Window { id, count: 0, expires_ms });
        if window.id != id {
            *window = Window { id, count: 0, expires_ms };
        }
        window.count = window.count.saturating_add(amount);
    }

    /// Counts one request in the 1-second window of `now_ms` unless `limit`
    /// are counted there already.
    pub fn admit_window_at(&self, key: &str, limit: u64, now_ms: u64) -> WindowVerdict {
        let (second, reset) = window_at(now_ms, SECOND_MS);
        let mut windows = self.lock();
        let count = Self::count(&windows, key, second);
        if count >= limit {
            return WindowVerdict::Limited { quota: Quota { limit, remaining: 0, reset } };
        }
        Self::add(&mut windows, key, second, 1, (second + 2) * SECOND_MS, now_ms);
        WindowVerdict::Admitted {
            slot: Slot { key: key.to_owned(), window: second },
            quota: Quota { limit, remaining: limit - count - 1, reset },
        }
    }

    /// Checks the user's RPM and TPM in the minute of `now_ms` and counts the
    /// request against RPM when both allow it.
    pub fn admit_user_at(&self, check: &UserCheck<'_>, now_ms: u64) -> UserVerdict {
        let (minute, reset) = window_at(now_ms, MINUTE_MS);
        let expires = (minute + 2) * MINUTE_MS;
        let limits = check.limits;
        let rpm_key = rpm_counter_key(check.user);
        let mut windows = self.lock();
        let requests = Self::count(&windows, &rpm_key, minute);
        let tokens = Self::count(&windows, &tpm_counter_key(check.user), minute);
        if let Some(limit) = limits.rpm
            && requests >= limit
        {
            return UserVerdict::RpmExceeded { quota: Quota { limit, remaining: 0, reset } };
        }
        if let Some(limit) = limits.tpm
            && tokens >= limit
        {
            return UserVerdict::TpmExceeded { quota: Quota { limit, remaining: 0, reset } };
        }
        let rpm_slot = limits.rpm.map(|_| {
            Self::add(&mut windows, &rpm_key, minute, 1, expires, now_ms);
            Slot { key: rpm_key, window: minute }
        });
        UserVerdict::Admitted {
            limits,
            rpm_slot,
            requests: limits.rpm.map(|limit| Quota { limit, remaining: limit - requests - 1, reset }),
            tokens: limits.tpm.map(|limit| Quota { limit, remaining: limit - tokens, reset }),
        }
    }

    /// Takes back one request counted in `slot`'s window (a no-op once the
    /// window has passed).
    pub fn release_now(&self, slot: &Slot) {
        let mut windows = self.lock();
        if let Some(window) = windows.get_mut(&slot.key)
            && window.id == slot.window
        {
            window.count = window.count.saturating_sub(1);
        }
    }

    /// Adds `tokens` to the user's TPM counter of the minute of `now_ms`.
    pub fn charge_tokens_at(&self, user: &str, tokens: u64, now_ms: u64) {
        let (minute, _) = window_at(now_ms, MINUTE_MS);
        Self::add(&mut self.lock(), &tpm_counter_key(user), minute, tokens, (minute + 2) * MINUTE_MS, now_ms);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
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
        UserCheck { user, limits: UserLimits { rpm, tpm }, lookup_record: false }
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
}
