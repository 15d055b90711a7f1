//! What one pod's engine reported: the readings routing compares pods by.
//! Plain data, shared by the scraper that fills it (`engine_metrics`), the
//! pod that holds its latest (`discovery`'s `PodLoad`) and the strategies
//! and request path that read it; it uses no other module.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

/// What one pod's engine reported at its last scrape, with recent-window
/// means and rates. `None` where the engine exports no such series (or, for
/// means, where no request finished within the window).
///
/// Laid out in the order written, the scrape time and the readings most
/// strategies compare first: a strategy choosing among pods reads those from
/// each pod's report, and with many pods they are rarely still in cache.
#[derive(Clone, Debug, PartialEq)]
#[repr(C)]
pub struct PodMetrics {
    pub scraped_at: Instant,
    /// KV cache in use, 0..1 (`vllm:kv_cache_usage_perc`, else the v0 name).
    pub kv_cache_usage: Option<f64>,
    /// GPU KV cache in use, 0..1 (`vllm:gpu_cache_usage_perc`, else the v1 name).
    pub gpu_cache_usage: Option<f64>,
    /// Requests in the running batch.
    pub running: Option<f64>,
    /// Requests queued for the batch.
    pub waiting: Option<f64>,
    /// Mean time to first token, seconds, over the window.
    pub time_to_first_token: Option<f64>,
    /// Mean time per output token, seconds, over the window.
    pub time_per_output_token: Option<f64>,
    /// Mean end-to-end request latency, seconds, over the window.
    pub e2e_latency: Option<f64>,
    /// Mean queueing time, seconds, over the window (newer engines only).
    pub queue_time: Option<f64>,
    /// Mean prefill time, seconds, over the window (vLLM only).
    pub prefill_time: Option<f64>,
    /// Prompt tokens processed per second over the window.
    pub prompt_tokens_per_second: Option<f64>,
    /// Tokens generated per second over the window.
    pub generation_tokens_per_second: Option<f64>,
    /// Requests finished per second over the window.
    pub requests_finished_per_second: Option<f64>,
    /// Tokens generated per finished request over the window.
    pub generation_tokens_per_request: Option<f64>,
    /// Share of the window with at least one request running.
    pub busy_fraction: Option<f64>,
    /// Prompt tokens found in the engine's prefix cache over those looked up.
    pub prefix_cache_hit_rate: Option<f64>,
    /// The engine says it sleeps (vLLM's sleep mode): it refuses requests.
    pub sleeping: bool,
    /// The engine's LoRA adapter slots and running adapters (vLLM only).
    pub lora: Option<LoraSlots>,
}

impl PodMetrics {
    /// Metrics of a pod that reported nothing but a scrape time; tests fill
    /// in the fields they need.
    pub fn empty(scraped_at: Instant) -> Self {
        Self {
            scraped_at,
            running: None,
            waiting: None,
            kv_cache_usage: None,
            gpu_cache_usage: None,
            time_to_first_token: None,
            time_per_output_token: None,
            e2e_latency: None,
            queue_time: None,
            prefill_time: None,
            prompt_tokens_per_second: None,
            generation_tokens_per_second: None,
            requests_finished_per_second: None,
            generation_tokens_per_request: None,
            busy_fraction: None,
            prefix_cache_hit_rate: None,
            sleeping: false,
            lora: None,
        }
    }
}

/// Most running adapters remembered per pod; vLLM runs at most `max_loras`
/// adapters in a batch, rarely more than a few.
pub const MAX_RUNNING_LORAS: usize = 16;

/// An engine's LoRA slots at its last report, kept without allocating: the
/// running adapters as hashes of their names.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraSlots {
    /// Adapters the engine can hold in GPU memory at once (`max_lora`).
    pub max_lora: u32,
    /// Adapters with requests running (`running_lora_adapters`).
    pub running: u32,
    /// [`lora_hash`] of the first [`MAX_RUNNING_LORAS`] running adapters.
    pub hashes: [u64; MAX_RUNNING_LORAS],
    /// The sample's value: vLLM sets it to the time of the report.
    pub reported: f64,
}

impl LoraSlots {
    /// Whether `hash` (of [`lora_hash`]) is among the running adapters.
    pub fn runs(&self, hash: u64) -> bool {
        let known = usize::try_from(self.running).unwrap_or(MAX_RUNNING_LORAS).min(MAX_RUNNING_LORAS);
        self.hashes.get(..known).is_some_and(|hashes| hashes.contains(&hash))
    }

    /// Whether another adapter could be loaded without evicting one.
    pub fn has_free_slot(&self) -> bool {
        self.running < self.max_lora
    }
}

/// The hash [`LoraSlots`] keeps an adapter name as.
pub fn lora_hash(name: &str) -> u64 {
    xxhash_rust::xxh64::xxh64(name.as_bytes(), 0x4c6f5241)
}

/// The readings of a report that strategies score pods by, each `None`
/// where the report has none: what [`PodGauges`] holds for a pod.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Gauges {
    pub kv_cache_usage: Option<f64>,
    pub gpu_cache_usage: Option<f64>,
    pub running: Option<f64>,
    pub waiting: Option<f64>,
    pub busy_fraction: Option<f64>,
    pub prompt_tokens_per_second: Option<f64>,
    pub generation_tokens_per_second: Option<f64>,
}

/// How many readings [`Gauges`] has.
const GAUGES: usize = 7;

impl Gauges {
    fn to_array(self) -> [Option<f64>; GAUGES] {
        [
            self.kv_cache_usage,
            self.gpu_cache_usage,
            self.running,
            self.waiting,
            self.busy_fraction,
            self.prompt_tokens_per_second,
            self.generation_tokens_per_second,
        ]
    }

    fn from_array(values: [Option<f64>; GAUGES]) -> Self {
        let [kv_cache_usage, gpu_cache_usage, running, waiting, busy_fraction, prompt, generation] = values;
        Self {
            kv_cache_usage,
            gpu_cache_usage,
            running,
            waiting,
            busy_fraction,
            prompt_tokens_per_second: prompt,
            generation_tokens_per_second: generation,
        }
    }
}

impl From<&PodMetrics> for Gauges {
    fn from(m: &PodMetrics) -> Self {
        Self {
            kv_cache_usage: m.kv_cache_usage,
            gpu_cache_usage: m.gpu_cache_usage,
            running: m.running,
            waiting: m.waiting,
            busy_fraction: m.busy_fraction,
            prompt_tokens_per_second: m.prompt_tokens_per_second,
            generation_tokens_per_second: m.generation_tokens_per_second,
        }
    }
}

/// The bits a missing reading is kept as: a NaN no reading is kept as (a
/// reported NaN is kept as the usual one), so a reported NaN stays a
/// reading and a missing one stays missing.
const MISSING: u64 = u64::MAX;

fn reading_bits(reading: Option<f64>) -> u64 {
    match reading {
        None => MISSING,
        Some(value) if value.to_bits() == MISSING => f64::NAN.to_bits(),
        Some(value) => value.to_bits(),
    }
}

fn reading_of(bits: u64) -> Option<f64> {
    (bits != MISSING).then(|| f64::from_bits(bits))
}

/// [`PodGauges`]' stamp while nothing is held.
const STAMP_NONE: i64 = i64::MIN;
/// [`PodGauges`]' stamp while a report is being written.
const STAMP_WRITING: i64 = i64::MAX;

/// The instant stamps count from: the first one asked for.
fn stamp_base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// `at` as nanoseconds from [`stamp_base`] (before it: negative), never one
/// of the sentinels.
fn stamp_of(at: Instant) -> i64 {
    let base = stamp_base();
    let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
    match at.checked_duration_since(base) {
        Some(after) => nanos(after),
        None => nanos(base.duration_since(at)).saturating_neg(),
    }
    .clamp(STAMP_NONE + 1, STAMP_WRITING - 1)
}

/// The low bits of a stamp: which write it was, so that two reports scraped
/// at the same time (to the 256 ns the stamp keeps) still differ.
const GENERATION_BITS: i64 = 0xFF;

fn instant_of(stamp: i64) -> Instant {
    let stamp = stamp & !GENERATION_BITS;
    let base = stamp_base();
    let offset = Duration::from_nanos(stamp.unsigned_abs());
    if stamp >= 0 { base.checked_add(offset) } else { base.checked_sub(offset) }.unwrap_or(base)
}

/// When a report was scraped, to 256 ns, as [`PodGauges`] keeps it: compared
/// as a number (a strategy judges many pods' staleness per request).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp(i64);

impl Stamp {
    /// Earlier than any scrape.
    pub const EARLIEST: Self = Self(i64::MIN);

    pub fn of(at: Instant) -> Self {
        Self(stamp_of(at) & !GENERATION_BITS)
    }

    /// The instant, to 256 ns (rounded down).
    pub fn instant(self) -> Instant {
        instant_of(self.0)
    }
}

/// A pod's latest [`Gauges`] and when they were scraped, in one cache line
/// of their own (the pod keeps its in-flight counts on the next), so a
/// strategy comparing many pods reads them with plain loads: no reference
/// taken and no read-modify-write (on x86 not even a fence), and one pod's
/// read need not wait for the last one's (taking a reference on each pod's
/// full report serialises the reads, each a cache miss with a large fleet).
///
/// A sequence lock: the stamp is the version. A writer takes its turn by
/// setting the stamp to `STAMP_WRITING` (waiting while another writer has
/// it), writes the readings, then sets the new stamp; a reader that saw the
/// stamp change while it read tries again, and one that finds a writer busy
/// is told so (and reads the full report). A stamp is the scrape time to
/// 256 ns, its low bits counting writes: as scrape times only grow, a reader
/// never mistakes two reports for one (with the same scrape time, only 256
/// writes during one read could make it).
#[derive(Debug)]
#[repr(C, align(64))]
pub struct PodGauges {
    stamp: AtomicI64,
    readings: [AtomicU64; GAUGES],
}

const _: () = assert!(std::mem::size_of::<PodGauges>() == 64, "one cache line");

impl Default for PodGauges {
    fn default() -> Self {
        Self { stamp: AtomicI64::new(STAMP_NONE), readings: std::array::from_fn(|_| AtomicU64::new(MISSING)) }
    }
}

/// Sets a stamp when dropped: a writer's last step, taken even if what it
/// ran meanwhile panicked, so no writer waits forever.
struct SetStamp<'a> {
    stamp: &'a AtomicI64,
    to: i64,
}

impl Drop for SetStamp<'_> {
    fn drop(&mut self) {
        self.stamp.store(self.to, Ordering::Release);
    }
}

impl PodGauges {
    /// Holds `report`, gauges scraped at that instant (`None`: holds none),
    /// and runs `also` while no other writer can: what the pod keeps beside
    /// them changes with them. Writers are rare (a pod's scrapes, and its
    /// replacement), so one that finds another busy yields until it is done.
    pub fn publish<R>(&self, report: Option<(Instant, Gauges)>, also: impl FnOnce() -> R) -> R {
        let previous = loop {
            let current = self.stamp.load(Ordering::Relaxed);
            if current == STAMP_WRITING {
                std::thread::yield_now();
            } else if (self.stamp.compare_exchange_weak(current, STAMP_WRITING, Ordering::Acquire, Ordering::Relaxed))
                .is_ok()
            {
                break current;
            }
        };
        // Readings written below are seen only with the stamp above (or a
        // later one), so a reader that saw any of them looks again.
        fence(Ordering::Release);
        let stamp = match report {
            Some((scraped_at, gauges)) => {
                for (slot, reading) in self.readings.iter().zip(gauges.to_array()) {
                    slot.store(reading_bits(reading), Ordering::Relaxed);
                }
                let generation = (previous & GENERATION_BITS).wrapping_add(1) & GENERATION_BITS;
                (stamp_of(scraped_at) & !GENERATION_BITS | generation).clamp(STAMP_NONE + 1, STAMP_WRITING - 1)
            }
            None => STAMP_NONE,
        };
        let _set = SetStamp { stamp: &self.stamp, to: stamp };
        also()
    }

    /// The stamp alone (what [`PodGauges::read`] reads first): a cheap read
    /// of the cache line the gauges are on.
    pub fn stamp(&self) -> u64 {
        self.stamp.load(Ordering::Relaxed) as u64
    }

    /// The gauges held and when they were scraped, if no writer is busy
    /// with them. A reader does not wait for a writer: a writer the OS
    /// stopped halfway would keep it waiting for a time slice.
    pub fn read(&self) -> GaugeRead {
        for _ in 0..READ_ATTEMPTS {
            let stamp = self.stamp.load(Ordering::Acquire);
            match stamp {
                STAMP_NONE => return GaugeRead::Empty,
                STAMP_WRITING => return GaugeRead::Busy,
                _ => {}
            }
            let bits: [u64; GAUGES] = std::array::from_fn(|i| self.readings[i].load(Ordering::Relaxed));
            fence(Ordering::Acquire);
            if self.stamp.load(Ordering::Relaxed) == stamp {
                return GaugeRead::Held(Stamp(stamp & !GENERATION_BITS), Gauges::from_array(bits.map(reading_of)));
            }
        }
        GaugeRead::Busy
    }
}

/// Reads of [`PodGauges`] that found readings changing before giving up.
const READ_ATTEMPTS: usize = 2;

/// What [`PodGauges::read`] found.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GaugeRead {
    /// Gauges scraped then.
    Held(Stamp, Gauges),
    /// None held.
    Empty,
    /// A writer was busy: read the full report instead.
    Busy,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    fn report(at: Instant, fill: impl FnOnce(&mut PodMetrics)) -> Option<(Instant, Gauges)> {
        let mut metrics = PodMetrics::empty(at);
        fill(&mut metrics);
        Some((at, Gauges::from(&metrics)))
    }

    #[test]
    fn gauges_hold_the_latest_report() {
        let gauges = PodGauges::default();
        assert_eq!(gauges.read(), GaugeRead::Empty, "nothing published yet");
        let now = Instant::now();
        let first = report(now, |m| {
            m.kv_cache_usage = Some(0.25);
            m.running = Some(3.0);
            m.waiting = Some(f64::NAN);
            m.e2e_latency = Some(9.0);
        });
        gauges.publish(first, || ());
        let GaugeRead::Held(at, read) = gauges.read() else { panic!("published") };
        let at = at.instant();
        assert!(at <= now && now.duration_since(at) < Duration::from_nanos(256), "the scrape time, to 256 ns");
        assert_eq!(Stamp::of(now).instant(), at);
        assert_eq!(read.kv_cache_usage, Some(0.25));
        assert_eq!(read.running, Some(3.0));
        assert!(read.waiting.is_some_and(f64::is_nan), "a reported NaN stays a reading");
        assert_eq!(read.gpu_cache_usage, None, "not reported");
        assert_eq!(Some(Gauges { waiting: None, ..read }), first.map(|(_, g)| Gauges { waiting: None, ..g }));
        gauges.publish(report(now, |m| m.gpu_cache_usage = Some(0.5)), || ());
        let GaugeRead::Held(again, read) = gauges.read() else { panic!("published") };
        assert_eq!(again.instant(), at, "the same scrape time");
        assert_eq!((read.kv_cache_usage, read.gpu_cache_usage), (None, Some(0.5)), "nothing kept from before");
        let busy = gauges.publish(report(now, |_| {}), || gauges.read());
        assert_eq!(busy, GaugeRead::Busy, "a reader during a write is told to look elsewhere, not kept waiting");
        assert_eq!(gauges.publish(None, || 7), 7, "runs what goes with it");
        assert_eq!(gauges.read(), GaugeRead::Empty, "cleared");
    }

    #[test]
    fn a_writer_that_panicked_does_not_hold_up_the_next() {
        let gauges = PodGauges::default();
        let now = Instant::now();
        let panicked = std::panic::catch_unwind(|| gauges.publish(report(now, |_| {}), || panic!("while writing")));
        assert!(panicked.is_err());
        assert!(matches!(gauges.read(), GaugeRead::Held(..)), "what it wrote stands");
        gauges.publish(None, || ());
        assert_eq!(gauges.read(), GaugeRead::Empty);
    }

    #[test]
    fn old_scrapes_keep_their_time() {
        let gauges = PodGauges::default();
        let now = Instant::now();
        let old = now.checked_sub(Duration::from_secs(3600)).unwrap_or(now);
        gauges.publish(report(old, |m| m.busy_fraction = Some(1.0)), || ());
        let GaugeRead::Held(at, read) = gauges.read() else { panic!("published") };
        let at = at.instant();
        assert!(at <= old && old.duration_since(at) < Duration::from_nanos(256), "before the stamps' base too");
        assert!(Stamp::of(old) < Stamp::of(now) && Stamp::EARLIEST < Stamp::of(old), "stamps order as instants");
        assert_eq!(read.busy_fraction, Some(1.0));
        gauges.publish(report(now, |_| {}), || ());
        gauges.publish(report(old, |_| {}), || ());
        assert!(
            matches!(gauges.read(), GaugeRead::Held(at, _) if at <= Stamp::of(old)),
            "an older report after a newer one"
        );
    }

    /// Readers racing a writer only ever see whole reports (or are told a
    /// writer is busy): each report has every reading equal, and a torn
    /// read would mix two.
    #[test]
    fn readers_never_see_half_a_report() {
        let gauges = Arc::new(PodGauges::default());
        let done = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (gauges, done) = (Arc::clone(&gauges), Arc::clone(&done));
                std::thread::spawn(move || {
                    let mut seen = 0u64;
                    while !done.load(Ordering::Relaxed) {
                        if let GaugeRead::Held(_, read) = gauges.read() {
                            let values = read.to_array();
                            assert!(values.iter().all(|v| *v == values[0]), "torn read: {read:?}");
                            seen += 1;
                        }
                    }
                    seen
                })
            })
            .collect();
        let start = Instant::now();
        for i in 0..200_000u32 {
            let v = Some(f64::from(i));
            // Scrape times grow, as the scraper's do.
            let now = start + Duration::from_nanos(256 * u64::from(i));
            let metrics = report(now, |m| {
                m.kv_cache_usage = v;
                m.gpu_cache_usage = v;
                m.running = v;
                m.waiting = v;
                m.busy_fraction = v;
                m.prompt_tokens_per_second = v;
                m.generation_tokens_per_second = v;
            });
            gauges.publish(metrics, || ());
        }
        done.store(true, Ordering::Relaxed);
        for reader in readers {
            assert!(reader.join().expect("reader") > 0, "the readers read");
        }
    }
}
