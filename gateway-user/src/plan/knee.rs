//! Judging a ramp: which stages a replica sustained, where the knee is, and
//! how many replicas a target load needs. Pure functions over measured
//! stages, so the rules are unit-tested without any traffic.

use std::time::Duration;

/// What one stage of the ramp measured.
#[derive(Clone, Debug, PartialEq)]
pub struct StageStats {
    /// Requests per second the stage sent (open loop: on schedule, whatever
    /// the answers do).
    pub offered_qps: f64,
    /// Successful answers per second, over the span the answers completed in.
    pub achieved_qps: f64,
    /// Requests sent.
    pub sent: u64,
    /// Requests that failed: a non-2xx status, a transport error or no
    /// answer within the request timeout.
    pub errors: u64,
    /// Latency percentiles of the successful requests, from the moment each
    /// was due to be sent (a late send counts against the system, not for it).
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
}

impl StageStats {
    /// Failed share of the requests sent (0 when none were sent).
    pub fn error_rate(&self) -> f64 {
        if self.sent == 0 { 0.0 } else { self.errors as f64 / self.sent as f64 }
    }
}

/// When a stage counts as past the knee.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Criteria {
    /// p99 latency may grow to this many times the lowest-load p99.
    pub latency_factor: f64,
    /// ... or by this much, whichever is larger: keeps a fast engine's
    /// scheduling jitter (a few milliseconds) from reading as a knee.
    pub latency_slack: Duration,
    /// Largest acceptable failed share of requests.
    pub max_error_rate: f64,
    /// Achieved QPS must reach this share of the offered QPS.
    pub min_achieved_ratio: f64,
}

impl Default for Criteria {
    fn default() -> Self {
        Self {
            latency_factor: 2.0,
            latency_slack: Duration::from_millis(10),
            max_error_rate: 0.01,
            min_achieved_ratio: 0.9,
        }
    }
}

/// How a stage went.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Sustained,
    /// Past the knee, with the first rule it broke.
    Degraded(Degradation),
}

/// The rule a degraded stage broke.
#[derive(Clone, Debug, PartialEq)]
pub enum Degradation {
    Errors { rate: f64 },
    Throughput { achieved_qps: f64, offered_qps: f64 },
    Latency { p99: Duration, limit: Duration },
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sustained => f.write_str("ok"),
            Self::Degraded(Degradation::Errors { rate }) => write!(f, "knee: {:.1}% errors", rate * 100.0),
            Self::Degraded(Degradation::Throughput { achieved_qps, offered_qps }) => {
                write!(f, "knee: achieved {achieved_qps:.1} of {offered_qps:.1} qps")
            }
            Self::Degraded(Degradation::Latency { p99, limit }) => {
                write!(f, "knee: p99 {:.0} ms > {:.0} ms", ms(*p99), ms(*limit))
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Criteria {
    /// The p99 a stage may reach given the lowest-load stage's p99.
    pub fn latency_limit(&self, baseline_p99: Duration) -> Duration {
        baseline_p99.mul_f64(self.latency_factor.max(1.0)).max(baseline_p99 + self.latency_slack)
    }

    /// Judges one stage against the lowest-load stage's p99 (`None`: this
    /// is the lowest-load stage, which only errors can fail).
    pub fn judge(&self, stage: &StageStats, baseline_p99: Option<Duration>) -> Verdict {
        let rate = stage.error_rate();
        if rate > self.max_error_rate || stage.p99.is_none() {
            return Verdict::Degraded(Degradation::Errors { rate });
        }
        if stage.achieved_qps < stage.offered_qps * self.min_achieved_ratio {
            return Verdict::Degraded(Degradation::Throughput {
                achieved_qps: stage.achieved_qps,
                offered_qps: stage.offered_qps,
            });
        }
        if let (Some(baseline), Some(p99)) = (baseline_p99, stage.p99) {
            let limit = self.latency_limit(baseline);
            if p99 > limit {
                return Verdict::Degraded(Degradation::Latency { p99, limit });
            }
        }
        Verdict::Sustained
    }
}

/// The ramp's answer: the highest load a set of replicas sustained.
#[derive(Clone, Debug, PartialEq)]
pub struct Capacity {
    /// Achieved QPS of the highest-offered sustained stage.
    pub peak_qps: f64,
    /// A stage past the knee was seen; without one the peak is only a lower
    /// bound (the ramp ran out of time or requests first).
    pub knee_found: bool,
}

/// Reads the capacity off judged stages (in any order): the best sustained
/// stage, and whether any stage degraded.
pub fn capacity(stages: &[(StageStats, Verdict)]) -> Option<Capacity> {
    let best = stages
        .iter()
        .filter(|(_, verdict)| *verdict == Verdict::Sustained)
        .max_by(|(a, _), (b, _)| a.offered_qps.total_cmp(&b.offered_qps))?;
    let knee_found = stages.iter().any(|(_, verdict)| matches!(verdict, Verdict::Degraded(_)));
    Some(Capacity { peak_qps: best.0.achieved_qps.min(best.0.offered_qps), knee_found })
}

/// Replica sizing from one measurement, as the production guide puts it:
/// measure, apply a safety margin, `replicas = ceil(target / sustainable)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sizing {
    /// Peak QPS one replica sustained (measured peak / replicas under test).
    pub peak_per_replica: f64,
    /// `peak_per_replica × safety margin`: the load to plan one replica for.
    pub sustainable_per_replica: f64,
    pub replicas: u64,
}

/// Sizes a deployment for `target_qps` from a peak measured over
/// `replicas_under_test` replicas. At least one replica.
pub fn size(peak_qps: f64, replicas_under_test: u32, safety_margin: f64, target_qps: f64) -> Sizing {
    let peak_per_replica = peak_qps / f64::from(replicas_under_test.max(1));
    let sustainable_per_replica = peak_per_replica * safety_margin;
    let replicas = if sustainable_per_replica > 0.0 {
        // A hair of tolerance so 100 / (40 × 0.625) is 4, not 5 from rounding.
        let exact = target_qps / sustainable_per_replica;
        (exact - 1e-9).ceil().max(1.0) as u64
    } else {
        0
    };
    Sizing { peak_per_replica, sustainable_per_replica, replicas }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(offered: f64, achieved: f64, errors: u64, p99_ms: u64) -> StageStats {
        StageStats {
            offered_qps: offered,
            achieved_qps: achieved,
            sent: 100,
            errors,
            p50: Some(Duration::from_millis(p99_ms / 2)),
            p99: Some(Duration::from_millis(p99_ms)),
        }
    }

    #[test]
    fn a_stage_degrades_on_latency_errors_or_throughput() {
        let criteria = Criteria::default();
        let base = Some(Duration::from_millis(100));
        assert_eq!(criteria.judge(&stage(10.0, 10.0, 0, 100), None), Verdict::Sustained);
        assert_eq!(criteria.judge(&stage(40.0, 39.0, 1, 199), base), Verdict::Sustained, "1% errors, < 2x p99");
        assert!(matches!(
            criteria.judge(&stage(40.0, 40.0, 0, 201), base),
            Verdict::Degraded(Degradation::Latency { .. })
        ));
        assert!(matches!(
            criteria.judge(&stage(40.0, 40.0, 2, 100), base),
            Verdict::Degraded(Degradation::Errors { .. })
        ));
        assert!(matches!(
            criteria.judge(&stage(40.0, 35.0, 0, 100), base),
            Verdict::Degraded(Degradation::Throughput { .. })
        ));
        let all_failed = StageStats { p50: None, p99: None, errors: 100, ..stage(5.0, 0.0, 0, 0) };
        assert!(matches!(criteria.judge(&all_failed, None), Verdict::Degraded(Degradation::Errors { .. })));
    }

    #[test]
    fn a_fast_baseline_gets_the_absolute_slack() {
        let criteria = Criteria::default();
        assert_eq!(criteria.latency_limit(Duration::from_millis(2)), Duration::from_millis(12));
        assert_eq!(criteria.latency_limit(Duration::from_millis(500)), Duration::from_millis(1000));
        let base = Some(Duration::from_millis(2));
        assert_eq!(criteria.judge(&stage(100.0, 100.0, 0, 9), base), Verdict::Sustained, "jitter, not a knee");
    }

    #[test]
    fn capacity_is_the_best_sustained_stage_whatever_the_order() {
        let criteria = Criteria::default();
        let base = Some(Duration::from_millis(100));
        // A coarse ramp, then refinement stages between the last good and the knee.
        let stages: Vec<_> = [
            stage(10.0, 10.0, 0, 100),
            stage(20.0, 19.8, 0, 102),
            stage(40.0, 39.5, 0, 110),
            stage(60.0, 41.0, 0, 1500),
            stage(50.0, 41.0, 0, 700),
            stage(45.0, 41.0, 0, 300),
        ]
        .into_iter()
        .map(|s| {
            let verdict = criteria.judge(&s, base);
            (s, verdict)
        })
        .collect();
        assert_eq!(capacity(&stages), Some(Capacity { peak_qps: 39.5, knee_found: true }));
        assert_eq!(
            capacity(&stages[..3]),
            Some(Capacity { peak_qps: 39.5, knee_found: false }),
            "no knee: a lower bound"
        );
        assert_eq!(capacity(&stages[3..4]), None, "nothing sustained");
    }

    #[test]
    fn replicas_are_the_ceiling_of_target_over_sustainable() {
        // 80 qps over 2 replicas: 40 each; 0.65 → 26 sustainable.
        let sizing = size(80.0, 2, 0.65, 100.0);
        assert!((sizing.peak_per_replica - 40.0).abs() < 1e-9);
        assert!((sizing.sustainable_per_replica - 26.0).abs() < 1e-9);
        assert_eq!(sizing.replicas, 4, "100 / 26 = 3.85");
        assert_eq!(size(40.0, 1, 0.625, 100.0).replicas, 4, "exactly 4, not 5 from float rounding");
        assert_eq!(size(40.0, 1, 0.65, 1.0).replicas, 1, "at least one");
        assert_eq!(size(40.0, 0, 0.65, 26.0).replicas, 1, "zero replicas under test reads as one");
        assert_eq!(size(0.0, 1, 0.65, 10.0).replicas, 0, "no capacity measured: no answer");
    }
}
