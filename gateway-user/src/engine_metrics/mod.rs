//! Engine metrics: what each ready pod's inference engine reports about
//! itself on `/metrics`, scraped in the background and read lock-free by
//! routing strategies.
//!
//! The [`scraper`] scrapes every ready pod (every 50 ms by default,
//! `AIBRIX_POD_METRIC_REFRESH_INTERVAL_MS`) within a budget of scrapes per
//! second over all pods ([`schedule`]: with many pods the period stretches
//! evenly, pods with requests in flight first), with a timeout per scrape and
//! a bound on scrapes in flight. Each scrape asks only for the series routing
//! reads ([`names`]), is reduced to signals ([`parse`]) and turned into
//! [`PodMetrics`] ([`window`] turns cumulative histograms and counters into
//! recent means and rates), published in the pod's slot. With Redis,
//! replicas share one scrape per pod per period ([`sharing`]). A request
//! loads the slot map once ([`EngineMetrics::view`]) and reads each
//! candidate's latest metrics; past the staleness cut-off (a few periods)
//! they count as missing.

mod names;
mod parse;
mod schedule;
pub mod scraper;
pub mod served_models;
pub mod sharing;
mod window;

// The parser and the names it reads, for `benches/parse.rs` and the fuzz
// target; not part of the gateway's API.
#[doc(hidden)]
pub use self::{
    names::for_engine,
    parse::{Scraped, parse},
};
pub use crate::engine_report::{Gauges, LoraSlots, PodMetrics, Stamp, lora_hash};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::discovery::{PodInfo, PodLoad};
use crate::metrics::PodAges;

/// Scraper settings (set by `turnstile serve` flags, whose defaults these are).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScrapeConfig {
    /// How often each ready pod's `/metrics` is scraped.
    pub interval: Duration,
    /// Time one scrape may take (connect and body) before it counts as failed.
    pub timeout: Duration,
    /// Age after which a pod's last scrape counts as missing for routing.
    pub stale_after: Duration,
    /// Most scrapes in flight at once, over all pods.
    pub concurrency: usize,
    /// Most scrapes started per second, over all pods: past
    /// `max_scrapes_per_second × interval` pods, the period stretches.
    pub max_scrapes_per_second: u32,
    /// Length of the recent window histogram means and token rates are taken over.
    pub window: Duration,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(1000),
            stale_after: Duration::from_millis(2000),
            concurrency: 16,
            max_scrapes_per_second: 500,
            window: Duration::from_secs(5),
        }
    }
}

/// The latest metrics of one pod, written by its scrape task only. They
/// are kept in the pod's [`PodLoad`], where requests read them through the
/// pod they are choosing between ([`MetricsView::reading_of`]); the slot is
/// what the store knows the pod by.
#[derive(Debug)]
pub struct PodSlot {
    model: Arc<str>,
    load: Arc<PodLoad>,
    /// The store's count of pods whose latest reading says they sleep.
    sleeping: Arc<AtomicUsize>,
}

impl PodSlot {
    fn new(model: &str, load: Arc<PodLoad>, sleeping: Arc<AtomicUsize>) -> Self {
        Self { model: Arc::from(model), load, sleeping }
    }

    /// The latest metrics, however old.
    fn latest(&self) -> Option<Arc<PodMetrics>> {
        self.load.engine_metrics()
    }

    fn publish(&self, metrics: PodMetrics) {
        self.replace(Some(Arc::new(metrics)));
    }

    /// Puts `metrics` in place of the latest, keeping the sleeping count.
    fn replace(&self, metrics: Option<Arc<PodMetrics>>) {
        let now = metrics.as_ref().is_some_and(|m| m.sleeping);
        let before = self.load.swap_engine_metrics(metrics).is_some_and(|m| m.sleeping);
        match (before, now) {
            (false, true) => {
                self.sleeping.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                self.sleeping.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

type Slots = HashMap<String, Arc<PodSlot>>;

/// The stamp before which readings are stale, judged at `now`.
fn stale_before(now: Instant, stale_after: Duration) -> Stamp {
    now.checked_sub(stale_after).map_or(Stamp::EARLIEST, Stamp::of)
}

/// Every scraped pod's latest metrics, keyed by pod key (`namespace/name`).
#[derive(Debug)]
pub struct EngineMetrics {
    slots: ArcSwap<Slots>,
    /// The staleness cut-off, nanoseconds: the configured one, raised by the
    /// scraper when the budget stretches the period.
    stale_after_nanos: AtomicU64,
    /// Serialises the scraper's slot-map updates (request paths never take it).
    writer: Mutex<()>,
    /// Pods whose latest reading says they sleep: while none does, requests
    /// skip looking (one load).
    sleeping: Arc<AtomicUsize>,
}

impl EngineMetrics {
    /// An empty store whose readings go stale after `stale_after`.
    pub fn new(stale_after: Duration) -> Self {
        Self {
            slots: ArcSwap::from_pointee(HashMap::new()),
            stale_after_nanos: AtomicU64::new(nanos(stale_after)),
            writer: Mutex::new(()),
            sleeping: Arc::default(),
        }
    }

    /// What a request reads: one atomic load, then plain lookups.
    pub fn view(&self) -> MetricsView {
        let (now, stale_after) = (Instant::now(), self.stale_after());
        MetricsView {
            source: ViewSource::Slots(self.slots.load_full()),
            now,
            stale_after,
            stale_before: stale_before(now, stale_after),
            any_sleeping: self.sleeping.load(Ordering::Relaxed) > 0,
        }
    }

    /// Age past which a reading counts as stale.
    pub fn stale_after(&self) -> Duration {
        Duration::from_nanos(self.stale_after_nanos.load(Ordering::Relaxed))
    }

    /// Judges staleness by `stale_after` from now on (the scraper's pace).
    fn set_stale_after(&self, stale_after: Duration) {
        self.stale_after_nanos.store(nanos(stale_after), Ordering::Relaxed);
    }

    /// The slot of `key`, created if the pod is new (or came back as a new
    /// pod, with a new `load`; it keeps the metrics it had). Used by the
    /// scraper.
    fn slot(&self, key: &str, model: &str, load: &Arc<PodLoad>) -> Arc<PodSlot> {
        let _guard = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.slots.load();
        let previous = current.get(key);
        if let Some(slot) = previous.filter(|s| &*s.model == model && Arc::ptr_eq(&s.load, load)) {
            return Arc::clone(slot);
        }
        let kept = previous.filter(|s| &*s.model == model).and_then(|s| s.latest());
        if let Some(previous) = previous {
            previous.replace(None);
        }
        let slot = Arc::new(PodSlot::new(model, Arc::clone(load), Arc::clone(&self.sleeping)));
        slot.replace(kept);
        let mut next: Slots = (**current).clone();
        next.insert(key.to_owned(), Arc::clone(&slot));
        self.slots.store(Arc::new(next));
        slot
    }

    /// Takes `metrics` as `pod`'s latest, as a scrape would: for metrics
    /// that come from elsewhere than the scraper (benchmarks), on a store no
    /// scraper fills (the scraper alone publishes to the slots it follows).
    pub fn record(&self, pod: &PodInfo, metrics: PodMetrics) {
        self.slot(&pod.key, &pod.model, &pod.load).publish(metrics);
    }

    /// Keeps only the slots of `keys` (pods that left lose their state).
    fn retain(&self, keep: impl Fn(&str) -> bool) {
        let _guard = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.slots.load();
        if current.keys().all(|k| keep(k)) {
            return;
        }
        let mut next = Slots::with_capacity(current.len());
        for (key, slot) in current.iter() {
            if keep(key) {
                next.insert(key.clone(), Arc::clone(slot));
            } else {
                // A pod no longer scraped has no metrics (not stale ones kept forever).
                slot.replace(None);
            }
        }
        self.slots.store(Arc::new(next));
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl PodAges for EngineMetrics {
    fn visit(&self, visit: &mut dyn FnMut(&str, &str, f64)) {
        let now = Instant::now();
        for (key, slot) in self.slots.load().iter() {
            if let Some(latest) = slot.latest() {
                visit(&slot.model, key, now.saturating_duration_since(latest.scraped_at).as_secs_f64());
            }
        }
    }
}

/// One pod's metrics as a request sees them.
#[derive(Clone, Debug)]
pub enum Reading {
    /// Scraped within the staleness cut-off.
    Fresh(Arc<PodMetrics>),
    /// Last scraped longer ago than the cut-off.
    Stale,
    /// Never scraped successfully (or not scraped at all).
    Missing,
}

#[derive(Clone, Debug)]
enum ViewSource {
    Slots(Arc<Slots>),
    /// Fixed readings, for strategy tests.
    Fixed(Arc<HashMap<String, Arc<PodMetrics>>>),
}

/// Why a pod's metrics cannot be read ([`MetricsView::read_fresh`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unfresh {
    /// Last scraped longer ago than the cut-off.
    Stale,
    /// Never scraped successfully (or not scraped at all).
    Missing,
}

/// The engine metrics of every pod at the moment a request is routed.
#[derive(Clone, Debug)]
pub struct MetricsView {
    source: ViewSource,
    now: Instant,
    stale_after: Duration,
    /// Readings scraped before this are stale (`now` less `stale_after`).
    stale_before: Stamp,
    /// Some pod's latest reading says it sleeps.
    any_sleeping: bool,
}

impl MetricsView {
    /// A view with no metrics at all (every pod reads as missing).
    pub fn empty() -> Self {
        Self::fixed(std::iter::empty(), Duration::from_secs(2))
    }

    /// A view of fixed readings, staleness judged against now.
    pub fn fixed(pods: impl IntoIterator<Item = (String, PodMetrics)>, stale_after: Duration) -> Self {
        let map: HashMap<String, Arc<PodMetrics>> = pods.into_iter().map(|(k, m)| (k, Arc::new(m))).collect();
        let any_sleeping = map.values().any(|m| m.sleeping);
        let now = Instant::now();
        let stale_before = stale_before(now, stale_after);
        Self { source: ViewSource::Fixed(Arc::new(map)), now, stale_after, stale_before, any_sleeping }
    }

    /// Whether the pod `key` says it sleeps (vLLM's sleep-state gauge). Sleep
    /// only ends with a wake-up call, so the last reading holds even when it
    /// is stale: a pod whose scrapes lag is not taken for awake.
    pub fn sleeping(&self, key: &str) -> bool {
        self.any_sleeping && self.latest(key).is_some_and(|m| m.sleeping)
    }

    /// Some pod's latest reading says it sleeps.
    pub fn any_sleeping(&self) -> bool {
        self.any_sleeping
    }

    /// The pod's latest metrics, however old.
    fn latest(&self, key: &str) -> Option<Arc<PodMetrics>> {
        match &self.source {
            ViewSource::Slots(slots) => slots.get(key).and_then(|slot| slot.latest()),
            ViewSource::Fixed(map) => map.get(key).cloned(),
        }
    }

    /// The metrics of the pod `key`.
    pub fn reading(&self, key: &str) -> Reading {
        self.judge(self.latest(key))
    }

    /// The metrics of `pod`, read through the pod itself (no lookup among
    /// the fleet's pods): what [`MetricsView::reading`] says of its key,
    /// but for a pod that came back as a new one until the scraper's next
    /// tick moves its metrics to it (missing meanwhile).
    pub fn reading_of(&self, pod: &PodInfo) -> Reading {
        let latest = match &self.source {
            ViewSource::Slots(_) => pod.load.engine_metrics(),
            ViewSource::Fixed(map) => map.get(&pod.key).cloned(),
        };
        self.judge(latest)
    }

    /// `read` of `pod`'s gauges when fresh, or why not: what
    /// [`MetricsView::reading_of`] says, read from the pod's own memory
    /// without taking a reference on its report.
    pub fn read_fresh<R>(&self, pod: &PodInfo, read: impl FnOnce(&Gauges) -> R) -> Result<R, Unfresh> {
        let latest = match &self.source {
            ViewSource::Slots(_) => pod.load.engine_gauges(),
            ViewSource::Fixed(map) => map.get(&pod.key).map(|m| (Stamp::of(m.scraped_at), Gauges::from(&**m))),
        };
        match latest {
            None => Err(Unfresh::Missing),
            Some((scraped_at, _)) if scraped_at < self.stale_before => Err(Unfresh::Stale),
            Some((_, gauges)) => Ok(read(&gauges)),
        }
    }

    /// Whether a reading scraped at `scraped_at` is past the cut-off.
    fn is_stale(&self, scraped_at: Instant) -> bool {
        self.now.saturating_duration_since(scraped_at) > self.stale_after
    }

    /// Fresh, stale or missing, by the view's clock.
    fn judge(&self, latest: Option<Arc<PodMetrics>>) -> Reading {
        match latest {
            None => Reading::Missing,
            Some(m) if self.is_stale(m.scraped_at) => Reading::Stale,
            Some(m) => Reading::Fresh(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_fresh_stale_or_missing() {
        let now = Instant::now();
        let old = now.checked_sub(Duration::from_secs(10)).unwrap_or(now);
        let view = MetricsView::fixed(
            [("ns/a".to_owned(), PodMetrics::empty(now)), ("ns/b".to_owned(), PodMetrics::empty(old))],
            Duration::from_secs(2),
        );
        assert!(matches!(view.reading("ns/a"), Reading::Fresh(_)));
        assert!(matches!(view.reading("ns/b"), Reading::Stale));
        assert!(matches!(view.reading("ns/c"), Reading::Missing));
    }

    #[test]
    fn slots_follow_pods_and_report_ages() {
        let store = EngineMetrics::new(Duration::from_secs(2));
        let (load_a, load_b) = (Arc::new(PodLoad::default()), Arc::new(PodLoad::default()));
        let a = store.slot("ns/a", "m", &load_a);
        let b = store.slot("ns/b", "m", &load_b);
        assert!(Arc::ptr_eq(&a, &store.slot("ns/a", "m", &load_a)), "same pod, same slot");
        assert!(matches!(store.view().reading("ns/a"), Reading::Missing), "not scraped yet");
        a.publish(PodMetrics { running: Some(3.0), ..PodMetrics::empty(Instant::now()) });
        b.publish(PodMetrics::empty(Instant::now()));
        let Reading::Fresh(m) = store.view().reading("ns/a") else { panic!("fresh") };
        assert_eq!(m.running, Some(3.0));
        let mut ages = Vec::new();
        store.visit(&mut |model, pod, age| ages.push((model.to_owned(), pod.to_owned(), age)));
        ages.sort_by(|x, y| x.1.cmp(&y.1));
        assert_eq!(ages.len(), 2);
        assert!(ages.iter().all(|(model, _, age)| model == "m" && *age < 1.0));

        store.retain(|key| key == "ns/b");
        assert!(matches!(store.view().reading("ns/a"), Reading::Missing), "pod left, state dropped");
        assert!(matches!(store.view().reading("ns/b"), Reading::Fresh(_)));
    }

    /// A pod with key `ns/a` serving `m`, with `load`.
    fn pod_a(load: &Arc<PodLoad>) -> PodInfo {
        PodInfo {
            key: "ns/a".into(),
            load: Arc::clone(load),
            ..crate::routing::test_support::pod(0, 0).0.as_ref().clone()
        }
    }

    #[test]
    fn requests_read_a_pods_metrics_through_the_pod() {
        let store = EngineMetrics::new(Duration::from_secs(2));
        let load = Arc::new(PodLoad::default());
        let slot = store.slot("ns/a", "m", &load);
        let pod = pod_a(&load);
        assert!(matches!(store.view().reading_of(&pod), Reading::Missing), "not scraped yet");
        assert_eq!(store.view().read_fresh(&pod, |m| m.running), Err(Unfresh::Missing));
        slot.publish(PodMetrics { running: Some(3.0), sleeping: true, ..PodMetrics::empty(Instant::now()) });
        let Reading::Fresh(m) = store.view().reading_of(&pod) else { panic!("fresh") };
        assert_eq!(m.running, Some(3.0));
        assert_eq!(store.view().read_fresh(&pod, |m| m.running), Ok(Some(3.0)));
        let old = Instant::now().checked_sub(Duration::from_secs(10)).unwrap_or_else(Instant::now);
        slot.publish(PodMetrics { running: Some(3.0), sleeping: true, ..PodMetrics::empty(old) });
        assert_eq!(store.view().read_fresh(&pod, |m| m.running), Err(Unfresh::Stale), "older than the cut-off");
        assert!(matches!(store.view().reading_of(&pod), Reading::Stale));
        slot.publish(PodMetrics { running: Some(3.0), sleeping: true, ..PodMetrics::empty(Instant::now()) });
        assert!(store.view().sleeping("ns/a"));

        // The pod came back as a new pod (a new load): its metrics move to it.
        let again = Arc::new(PodLoad::default());
        let moved = store.slot("ns/a", "m", &again);
        assert!(!Arc::ptr_eq(&slot, &moved));
        assert!(matches!(store.view().reading_of(&pod_a(&again)), Reading::Fresh(_)));
        assert!(matches!(store.view().reading_of(&pod), Reading::Missing), "the old pod's are gone");
        assert!(store.view().sleeping("ns/a"), "still asleep, counted once");
        assert_eq!(store.sleeping.load(Ordering::Relaxed), 1);

        // Serving another model, it starts over; once gone, nothing is left.
        store.slot("ns/a", "other", &again);
        assert!(matches!(store.view().reading_of(&pod_a(&again)), Reading::Missing));
        assert_eq!(store.sleeping.load(Ordering::Relaxed), 0);
        store.slot("ns/a", "m", &again).publish(PodMetrics { sleeping: true, ..PodMetrics::empty(Instant::now()) });
        assert_eq!(store.sleeping.load(Ordering::Relaxed), 1);
        store.retain(|_| false);
        assert_eq!(store.sleeping.load(Ordering::Relaxed), 0, "a pod no longer scraped sleeps no more");
        assert!(matches!(store.view().reading_of(&pod_a(&again)), Reading::Missing), "no longer scraped");
        assert!(matches!(store.view().reading("ns/a"), Reading::Missing));
    }
}
