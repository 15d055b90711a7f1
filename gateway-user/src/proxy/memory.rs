//! Giving memory back after a burst.
//!
//! A burst of thousands of requests allocates buffers on every worker
//! thread; glibc keeps what they free in per-thread arenas, so a gateway that
//! took one burst stayed tens of megabytes (hundreds, for big bursts) above
//! its idle size for good. Once the load has fallen back well below a peak,
//! `malloc_trim` returns the free pages of every arena to the system. It runs
//! at most once per check period and only after a real peak, so a steady
//! load never pays for it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::InFlightCount;

/// How often the load is looked at.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Checks after a burst that trim (while the load stays low).
const TRIMS_AFTER_BURST: u32 = 5;
/// Requests in flight that make a peak worth trimming after.
const PEAK_AT_LEAST: usize = 64;

/// Whether to trim now: the load seen since the last trim peaked at
/// [`PEAK_AT_LEAST`] or more and has fallen below a quarter of that peak.
fn trim_due(peak: usize, now: usize) -> bool {
    peak >= PEAK_AT_LEAST && now * 4 < peak
}

/// Looks at `in_flight` (its current count and the peak since the last
/// look) every [`CHECK_EVERY`] and trims the allocator after each burst,
/// until `shutdown`.
pub fn spawn_trimmer(in_flight: Arc<InFlightCount>, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut trims_left = 0u32;
        // The most requests in flight since the last trim.
        let mut peak = 0;
        let mut check = tokio::time::interval(CHECK_EVERY);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = check.tick() => {}
            }
            let now = in_flight.current.load(Ordering::Relaxed);
            peak = peak.max(in_flight.peak.swap(now, Ordering::Relaxed));
            if trim_due(peak, now) {
                peak = now;
                tracing::debug!(peak, now, "load fell after a burst; returning free memory");
                // Connections and pools wind down over the next seconds,
                // freeing more: trim again meanwhile.
                trims_left = TRIMS_AFTER_BURST;
            }
            if trims_left > 0 && now * 4 < PEAK_AT_LEAST {
                trims_left -= 1;
                // Off the workers: trimming a large heap takes a few ms.
                let _ = tokio::task::spawn_blocking(trim).await;
            }
        }
    });
}

#[cfg(target_env = "gnu")]
#[allow(unsafe_code)] // the one FFI call; the workspace denies unsafe elsewhere
fn trim() {
    // SAFETY: malloc_trim only walks the allocator's own free lists; it has
    // no preconditions and is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(target_env = "gnu"))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_only_once_a_real_peak_has_passed() {
        assert!(!trim_due(10, 0), "no burst");
        assert!(!trim_due(400, 300), "still busy");
        assert!(trim_due(400, 20));
        assert!(trim_due(PEAK_AT_LEAST, 0));
    }
}
