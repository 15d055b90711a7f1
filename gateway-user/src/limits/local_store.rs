//! In-process counters: the limiter of a gateway run without Redis (per
//! replica, as the seed says), and the backstop while Redis is unreachable.
//!
//! Windows come from the wall clock: 1-second windows for model RPS, minute
//! windows for user RPM/TPM. Each key keeps only its current window, so the
//! map holds one entry per model profile and active user.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{CounterStore, Slot, StoreError, UserCheck, UserVerdict, WindowVerdict, rpm_counter_key, tpm_counter_key};

/// Entries kept before expired windows are swept out.
const SWEEP_ABOVE_ENTRIES: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Window {
    /// Window number: unix second for RPS, unix minute for RPM/TPM.
    id: u64,
    count: u64,
    /// Unix second after which the entry is useless.
    expires_unix: u64,
}

/// In-process fixed-window counters.
#[derive(Debug, Default)]
pub struct LocalStore {
    windows: Mutex<HashMap<String, Window>>,
}

/// Current unix time in seconds.
pub(super) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl LocalStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Window>> {
        // Counters are plain numbers; a poisoned lock still holds valid ones.
        self.windows.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Count in `key`'s window `id`: the stored count when the entry is for
    /// that window, else zero.
    fn count(windows: &HashMap<String, Window>, key: &str, id: u64) -> u64 {
        windows.get(key).filter(|w| w.id == id).map_or(0, |w| w.count)
    }

    fn add(windows: &mut HashMap<String, Window>, key: &str, id: u64, amount: u64, expires_unix: u64, now: u64) {
        if windows.len() >= SWEEP_ABOVE_ENTRIES && !windows.contains_key(key) {
            windows.retain(|_, w| w.expires_unix > now);
        }
        let window = windows.entry(key.to_owned()).or_insert(Window { id, count: 0, expires_unix });
        if window.id != id {
            *window = Window { id, count: 0, expires_unix };
        }
        window.count = window.count.saturating_add(amount);
    }

    /// [`CounterStore::admit_window`] at unix second `now`.
    pub fn admit_window_at(&self, key: &str, limit: u64, now: u64) -> WindowVerdict {
        let mut windows = self.lock();
        if Self::count(&windows, key, now) >= limit {
            return WindowVerdict::Limited;
        }
        Self::add(&mut windows, key, now, 1, now + 2, now);
        WindowVerdict::Admitted(Slot { key: key.to_owned(), window: now })
    }

    /// [`CounterStore::admit_user`] at unix second `now`.
    pub fn admit_user_at(&self, check: &UserCheck<'_>, now: u64) -> UserVerdict {
        let minute = now / 60;
        let expires = (minute + 2) * 60;
        let limits = check.limits;
        let rpm_key = rpm_counter_key(check.user);
        let mut windows = self.lock();
        if let Some(limit) = limits.rpm
            && Self::count(&windows, &rpm_key, minute) >= limit
        {
            return UserVerdict::RpmExceeded { limit };
        }
        if let Some(limit) = limits.tpm
            && Self::count(&windows, &tpm_counter_key(check.user), minute) >= limit
        {
            return UserVerdict::TpmExceeded { limit };
        }
        let rpm_slot = limits.rpm.map(|_| {
            Self::add(&mut windows, &rpm_key, minute, 1, expires, now);
            Slot { key: rpm_key, window: minute }
        });
        UserVerdict::Admitted { limits, rpm_slot }
    }

    /// [`CounterStore::release`]: a slot of a window that has passed is gone already.
    pub fn release_now(&self, slot: &Slot) {
        let mut windows = self.lock();
        if let Some(window) = windows.get_mut(&slot.key)
            && window.id == slot.window
        {
            window.count = window.count.saturating_sub(1);
        }
    }

    /// [`CounterStore::charge_tokens`] at unix second `now`.
    pub fn charge_tokens_at(&self, user: &str, tokens: u64, now: u64) {
        let minute = now / 60;
        Self::add(&mut self.lock(), &tpm_counter_key(user), minute, tokens, (minute + 2) * 60, now);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

impl CounterStore for LocalStore {
    fn admit_window(&self, key: &str, limit: u64) -> impl Future<Output = Result<WindowVerdict, StoreError>> + Send {
        std::future::ready(Ok(self.admit_window_at(key, limit, unix_now())))
    }

    fn admit_user(&self, check: &UserCheck<'_>) -> impl Future<Output = Result<UserVerdict, StoreError>> + Send {
        std::future::ready(Ok(self.admit_user_at(check, unix_now())))
    }

    fn release(&self, slot: &Slot) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.release_now(slot);
        std::future::ready(Ok(()))
    }

    fn charge_tokens(&self, user: &str, tokens: u64) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.charge_tokens_at(user, tokens, unix_now());
        std::future::ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::UserLimits;

    const T0: u64 = 1_700_000_040; // a minute boundary

    fn admitted(v: &WindowVerdict) -> bool {
        matches!(v, WindowVerdict::Admitted(_))
    }

    #[test]
    fn exactly_limit_admitted_per_second_window() {
        let store = LocalStore::new();
        let got: Vec<bool> = (0..8).map(|_| admitted(&store.admit_window_at("m", 5, T0))).collect();
        assert_eq!(got, [true, true, true, true, true, false, false, false]);
        assert!(admitted(&store.admit_window_at("m", 5, T0 + 1)), "next second is a fresh window");
        assert!(admitted(&store.admit_window_at("other", 5, T0)), "keys count separately");
    }

    #[test]
    fn release_gives_the_slot_back_in_its_own_window_only() {
        let store = LocalStore::new();
        let WindowVerdict::Admitted(slot) = store.admit_window_at("m", 1, T0) else { panic!("admitted") };
        assert!(!admitted(&store.admit_window_at("m", 1, T0)));
        store.release_now(&slot);
        assert!(admitted(&store.admit_window_at("m", 1, T0)), "released slot is free again");

        let WindowVerdict::Admitted(old) = store.admit_window_at("m", 1, T0 + 1) else { panic!("admitted") };
        assert!(admitted(&store.admit_window_at("m", 2, T0 + 2)));
        store.release_now(&old);
        assert!(admitted(&store.admit_window_at("m", 2, T0 + 2)));
        assert!(!admitted(&store.admit_window_at("m", 2, T0 + 2)), "stale release did not free a new slot");
    }

    fn check(user: &str, rpm: Option<u64>, tpm: Option<u64>) -> UserCheck<'_> {
        UserCheck { user, limits: UserLimits { rpm, tpm }, lookup_record: false }
    }

    #[test]
    fn rpm_counts_requests_per_minute() {
        let store = LocalStore::new();
        let c = check("alice", Some(2), None);
        assert!(matches!(store.admit_user_at(&c, T0), UserVerdict::Admitted { rpm_slot: Some(_), .. }));
        assert!(matches!(store.admit_user_at(&c, T0 + 30), UserVerdict::Admitted { .. }));
        assert_eq!(store.admit_user_at(&c, T0 + 59), UserVerdict::RpmExceeded { limit: 2 });
        assert!(matches!(store.admit_user_at(&c, T0 + 60), UserVerdict::Admitted { .. }), "new minute");
    }

    #[test]
    fn tpm_is_checked_against_charged_tokens() {
        let store = LocalStore::new();
        let c = check("bob", None, Some(100));
        assert!(matches!(store.admit_user_at(&c, T0), UserVerdict::Admitted { rpm_slot: None, .. }));
        store.charge_tokens_at("bob", 99, T0 + 1);
        assert!(matches!(store.admit_user_at(&c, T0 + 2), UserVerdict::Admitted { .. }));
        store.charge_tokens_at("bob", 1, T0 + 3);
        assert_eq!(store.admit_user_at(&c, T0 + 4), UserVerdict::TpmExceeded { limit: 100 });
        assert!(matches!(store.admit_user_at(&c, T0 + 60), UserVerdict::Admitted { .. }));
    }

    #[test]
    fn refused_requests_are_not_counted() {
        let store = LocalStore::new();
        let both = check("carol", Some(1), Some(10));
        store.charge_tokens_at("carol", 10, T0);
        assert_eq!(store.admit_user_at(&both, T0), UserVerdict::TpmExceeded { limit: 10 });
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
        store.admit_window_at("fresh", 1, T0 + 10);
        assert_eq!(store.len(), 1, "only the live window is left");
    }
}
