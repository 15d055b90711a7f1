//! From cumulative engine series to recent behaviour.
//!
//! Engines export histograms and counters that only ever grow, so a mean
//! over their whole life says little about a pod that got slow a minute ago.
//! Each pod keeps the scrapes of a recent window; histogram means and token
//! rates come from the difference between the oldest and the newest scrape,
//! and the busy share from the running count seen in each.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::PodMetrics;
use super::parse::{HistogramTotals, Scraped};

/// Scrapes kept per window: older ones are thinned so a 50 ms interval does
/// not keep hundreds of points per pod.
const POINTS_PER_WINDOW: u32 = 32;

#[derive(Clone, Copy, Debug)]
struct Point {
    at: Instant,
    scraped: Scraped,
}

/// The recent scrapes of one pod, owned by its scrape task.
#[derive(Debug)]
pub struct History {
    window: Duration,
    points: VecDeque<Point>,
    /// When the newest scrape pushed was taken (kept or thinned out).
    newest: Option<Instant>,
}

impl History {
    pub fn new(window: Duration) -> Self {
        Self { window: window.max(Duration::from_millis(1)), points: VecDeque::new(), newest: None }
    }

    /// When the newest scrape pushed was taken.
    pub fn newest(&self) -> Option<Instant> {
        self.newest
    }

    /// Whether a scrape taken at `at` is newer than every one pushed so far
    /// (readings shared by other replicas can arrive late or twice).
    pub fn is_newer(&self, at: Instant) -> bool {
        self.newest.is_none_or(|newest| at > newest)
    }

    /// Adds the scrape taken at `at` and derives the pod's metrics from the
    /// window ending there.
    pub fn push(&mut self, at: Instant, scraped: Scraped) -> PodMetrics {
        self.newest = Some(self.newest.map_or(at, |newest| newest.max(at)));
        if self.points.back().is_some_and(|last| counters_went_back(&last.scraped, &scraped)) {
            // The engine restarted: its counters start again from zero.
            self.points.clear();
        }
        let start = at.checked_sub(self.window).unwrap_or(at);
        while self.points.front().is_some_and(|p| p.at < start) {
            self.points.pop_front();
        }
        let metrics = derive(self.points.front(), &self.points, Point { at, scraped });
        let spacing = self.window / POINTS_PER_WINDOW;
        if self.points.back().is_none_or(|last| at.saturating_duration_since(last.at) >= spacing) {
            self.points.push_back(Point { at, scraped });
        }
        metrics
    }
}

fn counters_went_back(before: &Scraped, now: &Scraped) -> bool {
    let back = |a: Option<f64>, b: Option<f64>| matches!((a, b), (Some(a), Some(b)) if b < a);
    let hist_back =
        |a: Option<HistogramTotals>, b: Option<HistogramTotals>| back(a.map(|h| h.count), b.map(|h| h.count));
    back(before.prompt_tokens, now.prompt_tokens)
        || back(before.generation_tokens, now.generation_tokens)
        || hist_back(before.time_to_first_token, now.time_to_first_token)
        || hist_back(before.e2e_latency, now.e2e_latency)
}

fn derive(oldest: Option<&Point>, kept: &VecDeque<Point>, now: Point) -> PodMetrics {
    let scraped = &now.scraped;
    let base = oldest.map(|p| &p.scraped);
    let span = oldest.map_or(Duration::ZERO, |p| now.at.saturating_duration_since(p.at)).as_secs_f64();
    let mean = |pick: fn(&Scraped) -> Option<HistogramTotals>| -> Option<f64> {
        let (then, now) = (pick(base?)?, pick(scraped)?);
        let count = now.count - then.count;
        (count > 0.0).then(|| ((now.sum - then.sum) / count).max(0.0))
    };
    // One scrape shows no movement yet: a rate of zero, not an unknown one.
    let rate = |pick: fn(&Scraped) -> Option<f64>| -> Option<f64> {
        let now = pick(scraped)?;
        match base.and_then(pick) {
            Some(then) if span > 0.0 => Some(((now - then) / span).max(0.0)),
            _ => Some(0.0),
        }
    };
    let delta = |pick: fn(&Scraped) -> Option<f64>| Some(pick(scraped)? - pick(base?)?);
    let requests_done = delta(|s| s.e2e_latency.map(|h| h.count));
    let generation_tokens_per_request = match (delta(|s| s.generation_tokens), requests_done) {
        (Some(tokens), Some(done)) if done > 0.0 => Some(tokens / done),
        _ => None,
    };
    let prefix_cache_hit_rate = match (delta(|s| s.prefix_cache_hits), delta(|s| s.prefix_cache_queries)) {
        (Some(hits), Some(queries)) if queries > 0.0 => Some((hits / queries).clamp(0.0, 1.0)),
        _ => None,
    };
    PodMetrics {
        scraped_at: now.at,
        running: scraped.running,
        waiting: scraped.waiting,
        kv_cache_usage: scraped.kv_cache_usage,
        gpu_cache_usage: scraped.gpu_cache_usage,
        time_to_first_token: mean(|s| s.time_to_first_token),
        time_per_output_token: mean(|s| s.time_per_output_token),
        e2e_latency: mean(|s| s.e2e_latency),
        queue_time: mean(|s| s.queue_time),
        prefill_time: mean(|s| s.prefill_time),
        prompt_tokens_per_second: rate(|s| s.prompt_tokens),
        generation_tokens_per_second: rate(|s| s.generation_tokens),
        requests_finished_per_second: rate(|s| s.e2e_latency.map(|h| h.count)),
        generation_tokens_per_request,
        busy_fraction: busy_fraction(kept, &now),
        prefix_cache_hit_rate,
        sleeping: scraped.awake.is_some_and(|awake| awake < 0.5),
        lora: scraped.lora,
    }
}

/// Share of the window during which the engine had requests running, each
/// scrape's running count holding until the next scrape.
fn busy_fraction(kept: &VecDeque<Point>, now: &Point) -> Option<f64> {
    let running_now = now.scraped.running?;
    let mut busy = 0.0;
    let mut total = 0.0;
    let mut points = kept.iter().chain(std::iter::once(now)).peekable();
    while let Some(point) = points.next() {
        let Some(next) = points.peek() else { break };
        let span = next.at.saturating_duration_since(point.at).as_secs_f64();
        total += span;
        if point.scraped.running.is_some_and(|r| r > 0.0) {
            busy += span;
        }
    }
    if total > 0.0 { Some(busy / total) } else { Some(if running_now > 0.0 { 1.0 } else { 0.0 }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(running: f64, ttft: (f64, f64), generated: f64) -> Scraped {
        Scraped {
            running: Some(running),
            time_to_first_token: Some(HistogramTotals { sum: ttft.0, count: ttft.1 }),
            generation_tokens: Some(generated),
            prompt_tokens: Some(0.0),
            ..Scraped::default()
        }
    }

    #[test]
    fn means_and_rates_come_from_the_window_not_the_lifetime() {
        let t0 = Instant::now();
        let mut history = History::new(Duration::from_secs(4));
        // A long slow past: 100 requests at 10 s each.
        let first = history.push(t0, scrape(0.0, (1000.0, 100.0), 0.0));
        assert_eq!(first.time_to_first_token, None, "no delta from one scrape");
        assert_eq!(first.generation_tokens_per_second, Some(0.0));
        // Then two fast requests (0.1 s each) and 20 tokens in 2 s.
        let second = history.push(t0 + Duration::from_secs(2), scrape(1.0, (1000.2, 102.0), 20.0));
        assert!((second.time_to_first_token.unwrap() - 0.1).abs() < 1e-9, "{second:?}");
        assert!((second.generation_tokens_per_second.unwrap() - 10.0).abs() < 1e-9);
        // Nothing completes for the next 3 s: the old scrape leaves the window.
        let third = history.push(t0 + Duration::from_secs(5), scrape(1.0, (1000.2, 102.0), 20.0));
        assert_eq!(third.time_to_first_token, None, "no request finished within the window");
        assert_eq!(third.generation_tokens_per_second, Some(0.0));
    }

    #[test]
    fn busy_share_weights_time() {
        let t0 = Instant::now();
        let mut history = History::new(Duration::from_secs(10));
        assert_eq!(history.push(t0, scrape(0.0, (0.0, 0.0), 0.0)).busy_fraction, Some(0.0));
        history.push(t0 + Duration::from_secs(1), scrape(2.0, (0.0, 0.0), 0.0));
        let m = history.push(t0 + Duration::from_secs(4), scrape(0.0, (0.0, 0.0), 0.0));
        // Idle 1 s, busy 3 s.
        assert!((m.busy_fraction.unwrap() - 0.75).abs() < 1e-9, "{m:?}");
    }

    #[test]
    fn a_restarted_engine_starts_a_new_window() {
        let t0 = Instant::now();
        let mut history = History::new(Duration::from_secs(10));
        history.push(t0, scrape(0.0, (50.0, 10.0), 500.0));
        let after = history.push(t0 + Duration::from_secs(1), scrape(0.0, (0.3, 1.0), 5.0));
        assert_eq!(after.time_to_first_token, None, "no negative deltas");
        assert_eq!(after.generation_tokens_per_second, Some(0.0));
    }

    #[test]
    fn missing_series_stay_missing() {
        let mut history = History::new(Duration::from_secs(10));
        let m = history.push(Instant::now(), Scraped::default());
        assert_eq!(m.running, None);
        assert_eq!(m.busy_fraction, None);
        assert_eq!(m.prompt_tokens_per_second, None);
        assert_eq!(m.kv_cache_usage, None);
    }
}
