//! Which pods to scrape now, within a budget of scrapes per second.
//!
//! A fixed period per pod makes the gateway's scrape work grow with the
//! fleet: 1,000 pods every 50 ms is 20,000 scrapes a second. Here the
//! gateway has a budget of scrapes per second instead, and the period
//! stretches evenly as pods are added:
//!
//! - pods with requests in flight through this gateway (the ones routing is
//!   choosing between right now) are refreshed first, every `interval`,
//!   with up to half the budget between them;
//! - the other pods share what is left, each every
//!   `max(interval, idle pods / remaining budget)`;
//! - a token bucket holds the total to the budget, so a burst (start-up,
//!   a rollout adding pods) is spread over the period rather than fired at
//!   once.
//!
//! [`Cadence::stale_after`] is the staleness cut-off for this pace: a few
//! idle periods, never less than the configured cut-off, so a large fleet's
//! metrics are not all judged stale just because the budget spreads them.

use std::time::{Duration, Instant};

/// Missed periods after which a pod's metrics count as stale.
pub const STALE_PERIODS: u32 = 4;

/// The pace the budget allows for a fleet of a given shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cadence {
    /// Gap between two scrapes of a pod with requests in flight.
    pub busy: Duration,
    /// Gap between two scrapes of any other pod.
    pub idle: Duration,
}

impl Cadence {
    /// The cadence for `pods` pods of which `busy` have requests in flight,
    /// scraped at most every `interval`, `budget` scrapes a second in all.
    pub fn new(interval: Duration, budget: f64, pods: usize, busy: usize) -> Self {
        let busy = busy.min(pods);
        let idle = pods - busy;
        let per_second = |n: usize, gap: Duration| n as f64 / gap.as_secs_f64().max(f64::MIN_POSITIVE);
        let budget = budget.max(f64::MIN_POSITIVE);
        // Busy pods: every interval, unless that takes more than half the budget.
        let busy_rate = per_second(busy, interval).min(budget / 2.0);
        let busy_gap = stretch(interval, busy, busy_rate);
        let idle_gap = stretch(interval, idle, budget - busy_rate);
        Self { busy: busy_gap, idle: idle_gap }
    }

    /// Age past which a reading counts as stale at this pace.
    pub fn stale_after(&self, configured: Duration) -> Duration {
        configured.max(self.idle.saturating_mul(STALE_PERIODS))
    }
}

/// The gap that spreads `pods` scrapes over `rate` a second, never under `interval`.
fn stretch(interval: Duration, pods: usize, rate: f64) -> Duration {
    if pods == 0 {
        return interval;
    }
    let seconds = pods as f64 / rate.max(f64::MIN_POSITIVE);
    interval.max(Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX))
}

/// What the planner needs to know of one pod.
#[derive(Clone, Copy, Debug)]
pub struct PodTurn {
    /// Requests in flight through this gateway.
    pub busy: bool,
    /// When its last scrape started (`None`: never).
    pub last_started: Option<Instant>,
    /// A scrape of it is under way.
    pub in_progress: bool,
}

/// Hands out scrapes within the budget.
#[derive(Debug)]
pub struct Planner {
    interval: Duration,
    budget: f64,
    tokens: f64,
    refilled_at: Instant,
}

impl Planner {
    /// A planner allowing `budget` scrapes a second (at least one), each pod
    /// at most every `interval`.
    pub fn new(interval: Duration, budget: f64, now: Instant) -> Self {
        let budget = budget.max(1.0);
        Self { interval, budget, tokens: 1.0, refilled_at: now }
    }

    /// The cadence for `pods` as they are now.
    pub fn cadence(&self, pods: &[PodTurn]) -> Cadence {
        let busy = pods.iter().filter(|p| p.busy).count();
        Cadence::new(self.interval, self.budget, pods.len(), busy)
    }

    /// The pods to start scraping at `now` (indices into `pods`): due busy
    /// pods first, then due idle pods, oldest first within each, as many as
    /// the budget has tokens for (the caller starts them as slots free up).
    pub fn due(&mut self, now: Instant, pods: &[PodTurn]) -> Vec<usize> {
        let elapsed = now.saturating_duration_since(self.refilled_at).as_secs_f64();
        self.refilled_at = now;
        // A bucket of one tick's worth (at least one scrape): enough to keep
        // pace, too small to fire a whole fleet at once.
        let capacity = (self.budget * self.interval.as_secs_f64()).max(1.0);
        self.tokens = (self.tokens + elapsed * self.budget).min(capacity);

        let cadence = self.cadence(pods);
        // Ticks come a hair late or early: a pod due within half a tick is due
        // now, or a pod meant for every tick would be scraped every other one.
        let early = self.interval / 2;
        let is_due = |pod: &PodTurn| {
            let gap = if pod.busy { cadence.busy } else { cadence.idle };
            !pod.in_progress && pod.last_started.is_none_or(|at| now.saturating_duration_since(at) + early >= gap)
        };
        let mut due: Vec<usize> = (0..pods.len()).filter(|&i| is_due(&pods[i])).collect();
        // Busy before idle; never-scraped before scraped; then oldest first.
        due.sort_by_key(|&i| (!pods[i].busy, pods[i].last_started));
        let allowed = self.tokens.floor() as usize;
        due.truncate(allowed);
        self.tokens -= due.len() as f64;
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(50);

    fn idle(n: usize) -> Vec<PodTurn> {
        vec![PodTurn { busy: false, last_started: None, in_progress: false }; n]
    }

    /// Runs the planner for `seconds` of ticks, scrapes finishing at once;
    /// returns how often each pod was scraped.
    fn run(planner: &mut Planner, pods: &mut [PodTurn], start: Instant, seconds: u64) -> Vec<u32> {
        let mut counts = vec![0; pods.len()];
        let ticks = seconds * 1000 / TICK.as_millis() as u64;
        for tick in 1..=ticks {
            let now = start + TICK * tick as u32;
            for i in planner.due(now, pods) {
                pods[i].last_started = Some(now);
                counts[i] += 1;
            }
        }
        counts
    }

    #[test]
    fn a_small_fleet_is_scraped_every_interval() {
        let cadence = Cadence::new(TICK, 500.0, 2, 0);
        assert_eq!(cadence, Cadence { busy: TICK, idle: TICK });
        let start = Instant::now();
        let mut planner = Planner::new(TICK, 500.0, start);
        let mut pods = idle(2);
        let counts = run(&mut planner, &mut pods, start, 10);
        // 200 ticks in 10 s; each pod once a tick.
        assert!(counts.iter().all(|&c| c >= 199), "{counts:?}");
    }

    #[test]
    fn a_tick_a_hair_early_still_scrapes_every_interval() {
        let start = Instant::now();
        let mut planner = Planner::new(TICK, 500.0, start);
        let mut pods = idle(1);
        let mut scraped = 0;
        for tick in 1..=100u32 {
            // Each tick up to 1 ms off its mark.
            let now = start + TICK * tick - Duration::from_micros(u64::from(tick % 3) * 400);
            for i in planner.due(now, &pods) {
                pods[i].last_started = Some(now);
                scraped += 1;
            }
        }
        assert_eq!(scraped, 100);
    }

    #[test]
    fn a_large_fleet_stretches_the_period_evenly_within_the_budget() {
        let cadence = Cadence::new(TICK, 500.0, 1000, 0);
        assert_eq!(cadence.idle, Duration::from_secs(2), "1,000 pods at 500/s");
        assert_eq!(cadence.stale_after(Duration::from_secs(2)), Duration::from_secs(8));
        let start = Instant::now();
        let mut planner = Planner::new(TICK, 500.0, start);
        let mut pods = idle(1000);
        let counts = run(&mut planner, &mut pods, start, 20);
        let total: u32 = counts.iter().sum();
        // At most the budget (plus the bucket's first tick), and close to it.
        assert!(total <= 500 * 20 + 25, "over budget: {total}");
        assert!(total >= 500 * 19, "budget left unused: {total}");
        // Evenly: every pod scraped about every 2 s.
        let (min, max) = (counts.iter().min().copied(), counts.iter().max().copied());
        assert!(min >= Some(9) && max <= Some(11), "uneven: {min:?}..{max:?}");
    }

    #[test]
    fn pods_with_requests_in_flight_are_refreshed_first() {
        let start = Instant::now();
        let mut planner = Planner::new(TICK, 200.0, start);
        let mut pods = idle(1000);
        for pod in pods.iter_mut().take(3) {
            pod.busy = true;
        }
        let counts = run(&mut planner, &mut pods, start, 10);
        // The three busy pods every tick; the idle ones share what is left.
        assert!(counts[..3].iter().all(|&c| c >= 198), "busy pods lag: {:?}", &counts[..3]);
        let idle_total: u32 = counts[3..].iter().sum();
        assert!(idle_total >= 200 * 10 - 3 * 200 - 20, "idle pods starved: {idle_total}");
        assert!(counts.iter().sum::<u32>() <= 200 * 10 + 10, "over budget");
    }

    #[test]
    fn busy_pods_cannot_take_the_whole_budget() {
        let cadence = Cadence::new(TICK, 100.0, 1000, 500);
        // 500 busy pods would need 10,000/s: they get half of 100/s.
        assert_eq!(cadence.busy, Duration::from_secs(10));
        assert_eq!(cadence.idle, Duration::from_secs(10));
    }

    #[test]
    fn scrapes_in_progress_and_the_tokens_bound_what_starts() {
        let start = Instant::now();
        // 80 a second: a bucket of four per 50 ms tick.
        let mut planner = Planner::new(TICK, 80.0, start);
        let mut pods = idle(10);
        pods[0].in_progress = true;
        let now = start + Duration::from_secs(1);
        let due = planner.due(now, &pods);
        assert_eq!(due.len(), 4);
        assert!(!due.contains(&0), "a pod already being scraped is not started again");
    }
}
