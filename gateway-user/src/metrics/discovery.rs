//! Discovery metrics: what the pod watch saw, and how current its view is.
//!
//! Readiness transitions (churn) are counted by the pod store, which sees
//! every source; these families are about the source itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

const LAST_SYNC_AGE: &str = "aibrix_gateway_discovery_last_sync_age_seconds";
const LAST_SYNC_AGE_HELP: &str = "Seconds the discovered pod view may be behind the API server: 0 while the \
     watch is established; after a list or watch failure, time since the last successful sync; before the \
     first complete list, time since start";

/// `kind` label of `aibrix_gateway_discovery_events_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiscoveryEvent {
    /// A pod was added or changed.
    Applied,
    /// A pod was deleted.
    Deleted,
    /// A full list of pods completed (the first one included).
    Relist,
    /// A list or watch failed; the watcher retries with backoff.
    Error,
}

impl DiscoveryEvent {
    fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Deleted => "deleted",
            Self::Relist => "relist",
            Self::Error => "error",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    /// `kubernetes`
    source: &'static str,
    kind: &'static str,
}

/// Discovery families, registered once at start.
pub struct DiscoveryMetrics {
    events: Family<EventLabels, Counter>,
    freshness: Arc<Freshness>,
}

impl DiscoveryMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let events = Family::default();
        registry.register(
            "aibrix_gateway_discovery_events",
            "Discovery events by source and kind: applied and deleted pods, completed (re)lists, list or watch errors",
            events.clone(),
        );
        let freshness = Arc::new(Freshness::new());
        registry.register_collector(Box::new(Arc::clone(&freshness)));
        Self { events, freshness }
    }

    /// Counts one event of a discovery source.
    pub fn event(&self, source: &'static str, kind: DiscoveryEvent) {
        self.events.get_or_create(&EventLabels { source, kind: kind.as_str() }).inc();
    }

    /// A watching source started: the last-sync age is reported from now on.
    pub fn watch_started(&self) {
        self.freshness.watching.store(true, Ordering::Release);
    }

    /// The pod view is known current: a list completed, an event arrived, or
    /// the API server accepted a watch.
    pub fn synced(&self) {
        self.freshness.last_sync_nanos.store(self.freshness.nanos_since_start(), Ordering::Release);
        self.freshness.broken.store(false, Ordering::Release);
    }

    /// A list or watch failed: the view ages from the last sync until the next one.
    pub fn sync_failed(&self) {
        self.freshness.broken.store(true, Ordering::Release);
    }
}

/// The state behind the last-sync age gauge, computed at scrape time.
#[derive(Debug)]
struct Freshness {
    started: Instant,
    /// Nanoseconds after `started` of the last sync; [`Freshness::NEVER`] before the first.
    last_sync_nanos: AtomicU64,
    /// A list or watch failed after the last sync.
    broken: AtomicBool,
    /// Only a watching source has a sync to age; the series is absent otherwise.
    watching: AtomicBool,
}

impl Freshness {
    const NEVER: u64 = u64::MAX;

    fn new() -> Self {
        Self {
            started: Instant::now(),
            last_sync_nanos: AtomicU64::new(Self::NEVER),
            broken: AtomicBool::new(false),
            watching: AtomicBool::new(false),
        }
    }

    fn nanos_since_start(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(Self::NEVER - 1)
    }

    fn age_seconds(&self) -> f64 {
        let now = self.nanos_since_start();
        let since = match self.last_sync_nanos.load(Ordering::Acquire) {
            Self::NEVER => 0,
            _ if !self.broken.load(Ordering::Acquire) => return 0.0,
            last => last,
        };
        Duration::from_nanos(now.saturating_sub(since)).as_secs_f64()
    }
}

impl Collector for Freshness {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if !self.watching.load(Ordering::Acquire) {
            return Ok(());
        }
        let gauge = ConstGauge::new(self.age_seconds());
        let metric = encoder.encode_descriptor(LAST_SYNC_AGE, LAST_SYNC_AGE_HELP, None, gauge.metric_type())?;
        gauge.encode(metric)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, registry).expect("encode");
        out
    }

    fn age_line(text: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(&format!("{LAST_SYNC_AGE} "))).map(|v| v.parse().expect("a number"))
    }

    #[test]
    fn events_are_counted_by_source_and_kind() {
        let mut registry = Registry::default();
        let metrics = DiscoveryMetrics::register(&mut registry);
        metrics.event("kubernetes", DiscoveryEvent::Applied);
        metrics.event("kubernetes", DiscoveryEvent::Applied);
        metrics.event("kubernetes", DiscoveryEvent::Relist);
        let text = render(&registry);
        assert!(
            text.contains(r#"aibrix_gateway_discovery_events_total{source="kubernetes",kind="applied"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"aibrix_gateway_discovery_events_total{source="kubernetes",kind="relist"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn sync_age_is_absent_without_a_watch_zero_while_synced_and_grows_after_a_failure() {
        let mut registry = Registry::default();
        let metrics = DiscoveryMetrics::register(&mut registry);
        assert_eq!(age_line(&render(&registry)), None, "the pods file has no sync age");

        metrics.watch_started();
        let before_first_list = age_line(&render(&registry)).expect("reported once watching");
        assert!(before_first_list >= 0.0);

        metrics.synced();
        assert_eq!(age_line(&render(&registry)), Some(0.0));

        metrics.sync_failed();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let broken = age_line(&render(&registry)).expect("age");
        assert!((0.005..5.0).contains(&broken), "age since the last sync: {broken}");

        metrics.synced();
        assert_eq!(age_line(&render(&registry)), Some(0.0), "a new sync resets the age");
    }
}
