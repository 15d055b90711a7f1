//! Prometheus metrics, registered once at start as typed families.
//!
//! Label values come from bounded sets: model names the gateway discovered
//! (a model a client merely asked for is `unknown`), status codes, strategy
//! names and pod keys. Never user ids or request ids.

use std::sync::{Arc, Mutex, PoisonError, Weak};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

mod aibrix;
mod discovery;
mod logs;
mod pd;
mod routing;
mod traces;
pub use aibrix::{AibrixMetrics, AibrixStatus, PodIdentity, SeriesHandles};
pub use discovery::{DiscoveryEvent, DiscoveryMetrics};
pub use logs::LogLines;
pub use pd::{PdMetrics, PrefillErrorReason};
pub use routing::{PodAges, RoutingMetrics};
pub use traces::{SpanDrop, TraceMetrics};

/// Model label for requests that never matched a discovered model.
pub const UNKNOWN_MODEL: &str = "unknown";

/// What the metrics export beyond Turnstile's own families.
#[derive(Clone, Debug)]
pub struct MetricsConfig {
    /// Also export AIBrix's metric names (`gateway_*`, `aibrix_prefix_cache_*`, `pd_selected_*`).
    pub aibrix_names: bool,
    /// AIBrix's `gateway_pod` label: this gateway's pod name (env `POD_NAME`).
    pub gateway_pod: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { aibrix_names: true, gateway_pod: String::new() }
    }
}

impl MetricsConfig {
    /// The defaults, with `gateway_pod` read from env `POD_NAME` as AIBrix does.
    pub fn from_env(aibrix_names: bool) -> Self {
        Self { aibrix_names, gateway_pod: std::env::var("POD_NAME").unwrap_or_default() }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: Arc<str>,
    status_code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelStrategyLabels {
    model: Arc<str>,
    /// Strategy names are static: no allocation per request.
    strategy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadinessLabels {
    model: Arc<str>,
    pod: Arc<str>,
    ready: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RateLimitLabels {
    model: Arc<str>,
    profile: Arc<str>,
    /// rps | rpm | tpm
    limit: &'static str,
    /// allowed | limited | store_error_allowed | store_error_denied
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectionLabels {
    model: Arc<str>,
    profile: Arc<str>,
    /// rps | rpm | tpm
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreOpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreErrorLabels {
    op: &'static str,
    /// timeout | circuit_open | error
    kind: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WakeLabels {
    model: Arc<str>,
    /// `woken` or `failed`.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoraTierLabels {
    /// The adapter's model name.
    model: Arc<str>,
    /// `running`, `free_slot` or `other`.
    tier: &'static str,
}

/// All gateway metric families.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    routing_latency: HistogramFamily<ModelStrategyLabels>,
    upstream_ttft: HistogramFamily<ModelLabels>,
    request_duration: HistogramFamily<ModelLabels>,
    in_flight: Family<ModelLabels, Gauge>,
    readiness_transitions: Family<ReadinessLabels, Counter>,
    /// Discovery source events and the age of its last sync.
    pub discovery: DiscoveryMetrics,
    /// Strategy fallbacks, prefix-cache hits, engine metrics scrapes.
    pub routing: RoutingMetrics,
    /// Prefill/decode disaggregation: selections, prefill latency and errors.
    pub pd: PdMetrics,
    /// Spans exported to the OTLP collector, and spans lost.
    pub traces: TraceMetrics,
    invalid_configs: Family<ModelLabels, Counter>,
    wakeups: Family<WakeLabels, Counter>,
    lora_tiers: Family<LoraTierLabels, Counter>,
    ratelimit_decisions: Family<RateLimitLabels, Counter>,
    ratelimit_rejections: Family<RejectionLabels, Counter>,
    /// Requests in flight per pod, read from the pod store at scrape time.
    pod_in_flight: Arc<PodInFlightGauge>,
    ratelimit_store_latency: HistogramFamily<StoreOpLabels>,
    ratelimit_store_errors: Family<StoreErrorLabels, Counter>,
    ratelimit_breaker_state: Gauge,
    /// Kernel assist's series (`aibrix_gateway_kernel_*`), read at scrape time
    /// from the eBPF maps or userspace tallies once kernel assist has started.
    kernel: LateCollector,
    /// AIBrix's names for the same events, unless `--aibrix-metric-names=false`.
    aibrix: Option<AibrixMetrics>,
}

/// A collector registered at start whose source arrives later.
#[derive(Clone, Debug, Default)]
struct LateCollector(Arc<std::sync::OnceLock<Box<dyn prometheus_client::collector::Collector>>>);

impl prometheus_client::collector::Collector for LateCollector {
    fn encode(&self, encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        match self.0.get() {
            Some(collector) => collector.encode(encoder),
            None => Ok(()),
        }
    }
}

fn routing_histogram() -> Histogram {
    // 1 µs .. ~16 ms: routing is in-memory work.
    Histogram::new(exponential_buckets(1e-6, 2.0, 15))
}

fn store_histogram() -> Histogram {
    // 50 µs .. ~0.8 s: Redis answers in well under a millisecond when healthy.
    Histogram::new(exponential_buckets(5e-5, 2.0, 15))
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s: engines answer in milliseconds to minutes.
    Histogram::new(exponential_buckets(1e-3, 2.0, 17))
}

impl Metrics {
    /// Exports the log's counts (`turnstile_log_*`), read from `read` at
    /// scrape time.
    pub fn with_log_lines(mut self, read: fn() -> LogLines) -> Self {
        self.registry.register_collector(Box::new(logs::LogCollector(read)));
        self
    }

    /// Turnstile's families and AIBrix's names, with an empty `gateway_pod`.
    pub fn new() -> Self {
        Self::with_config(&MetricsConfig::default())
    }

    pub fn with_config(config: &MetricsConfig) -> Self {
        let mut registry = Registry::default();
        let aibrix = config.aibrix_names.then(|| AibrixMetrics::register(&mut registry, &config.gateway_pod));
        let requests = Family::default();
        registry.register(
            "aibrix_gateway_requests",
            "Requests answered, by model and HTTP status code",
            requests.clone(),
        );
        let routing_latency: HistogramFamily<_> = Family::new_with_constructor(routing_histogram);
        registry.register(
            "aibrix_gateway_routing_latency_seconds",
            "Time from request arrival to pod chosen",
            routing_latency.clone(),
        );
        let upstream_ttft: HistogramFamily<_> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "aibrix_gateway_upstream_ttft_seconds",
            "Time from request arrival to the first response byte from the engine",
            upstream_ttft.clone(),
        );
        let request_duration: HistogramFamily<_> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "aibrix_gateway_request_duration_seconds",
            "Time from request arrival to the end of the response",
            request_duration.clone(),
        );
        let in_flight = Family::default();
        registry.register(
            "aibrix_gateway_in_flight_requests",
            "Requests routed to an engine whose response has not ended",
            in_flight.clone(),
        );
        let readiness_transitions = Family::default();
        registry.register(
            "aibrix_gateway_pod_readiness_transitions",
            "Pod readiness changes seen by discovery (churn)",
            readiness_transitions.clone(),
        );
        let discovery = DiscoveryMetrics::register(&mut registry);
        let routing = RoutingMetrics::register(&mut registry, aibrix.clone());
        let pd = PdMetrics::register(&mut registry, aibrix.clone());
        let traces = TraceMetrics::register(&mut registry);
        let invalid_configs = Family::default();
        registry.register(
            "aibrix_gateway_invalid_config",
            "model.aibrix.ai/config annotations ignored because they do not parse",
            invalid_configs.clone(),
        );
        let wakeups = Family::default();
        registry.register(
            "aibrix_gateway_model_wakeups",
            "Wake-up calls sent to a pod of a model whose every pod sleeps, by outcome (woken, failed)",
            wakeups.clone(),
        );
        let lora_tiers = Family::default();
        registry.register(
            "turnstile_lora_affinity_routes",
            "Requests for a LoRA adapter by the tier of pods they were routed among: running (the adapter runs there), free_slot, other",
            lora_tiers.clone(),
        );
        let ratelimit_decisions = Family::default();
        registry.register(
            "aibrix_gateway_ratelimit_decisions",
            "Limit checks by model, profile, limit (rps, rpm, tpm) and decision",
            ratelimit_decisions.clone(),
        );
        let ratelimit_rejections = Family::default();
        registry.register(
            "aibrix_gateway_ratelimit_rejections",
            "Requests answered 429 by a limit: model RPS (rps) or the user's RPM/TPM (rpm, tpm), by model and profile",
            ratelimit_rejections.clone(),
        );
        let pod_in_flight = Arc::new(PodInFlightGauge::default());
        registry.register_collector(Box::new(Arc::clone(&pod_in_flight)));
        let ratelimit_store_latency: HistogramFamily<_> = Family::new_with_constructor(store_histogram);
        registry.register(
            "aibrix_gateway_ratelimit_store_latency_seconds",
            "Duration of rate-limit store (Redis) calls, by operation",
            ratelimit_store_latency.clone(),
        );
        let ratelimit_store_errors = Family::default();
        registry.register(
            "aibrix_gateway_ratelimit_store_errors",
            "Rate-limit store calls that failed, timed out or were skipped by the open circuit",
            ratelimit_store_errors.clone(),
        );
        let ratelimit_breaker_state = Gauge::default();
        registry.register(
            "aibrix_gateway_ratelimit_breaker_state",
            "Circuit breaker in front of the rate-limit store: 0 closed, 1 half-open, 2 open",
            ratelimit_breaker_state.clone(),
        );
        let kernel = LateCollector::default();
        registry.register_collector(Box::new(kernel.clone()));
        Self {
            registry,
            requests,
            routing_latency,
            upstream_ttft,
            request_duration,
            in_flight,
            readiness_transitions,
            discovery,
            routing,
            pd,
            traces,
            invalid_configs,
            wakeups,
            lora_tiers,
            ratelimit_decisions,
            ratelimit_rejections,
            pod_in_flight,
            ratelimit_store_latency,
            ratelimit_store_errors,
            ratelimit_breaker_state,
            kernel,
            aibrix,
        }
    }

    /// AIBrix's names, when exported.
    pub fn aibrix(&self) -> Option<&AibrixMetrics> {
        self.aibrix.as_ref()
    }

    /// Installs kernel assist's scrape-time collector (once; later calls are ignored).
    pub fn set_kernel_collector(&self, collector: Box<dyn prometheus_client::collector::Collector>) {
        let _ = self.kernel.0.set(collector);
    }

    /// Renders every family in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// A request was answered with `status_code`, by `pod` or (`None`) by the gateway.
    pub fn request_done<P: PodIdentity + 'static>(&self, model: &Arc<str>, pod: Option<&Arc<P>>, status_code: u16) {
        self.requests.get_or_create(&RequestLabels { model: Arc::clone(model), status_code }).inc();
        if let Some(aibrix) = &self.aibrix {
            aibrix.request(model, pod);
        }
    }

    pub fn routed(&self, model: &Arc<str>, strategy: &'static str, seconds: f64) {
        let labels = ModelStrategyLabels { model: Arc::clone(model), strategy };
        self.routing_latency.get_or_create(&labels).observe(seconds);
    }

    pub fn upstream_first_byte(&self, model: &Arc<str>, seconds: f64) {
        self.upstream_ttft.get_or_create(&ModelLabels { model: Arc::clone(model) }).observe(seconds);
    }

    pub fn request_finished(&self, model: &Arc<str>, seconds: f64) {
        self.request_duration.get_or_create(&ModelLabels { model: Arc::clone(model) }).observe(seconds);
    }

    /// Marks a request in flight for `model` until the returned guard drops.
    pub fn in_flight(self: &Arc<Self>, model: &Arc<str>) -> InFlightMetric {
        let gauge = self.in_flight.get_or_create(&ModelLabels { model: Arc::clone(model) }).clone();
        gauge.inc();
        let aibrix = self.aibrix.as_ref().map(|aibrix| aibrix.in_flight(model));
        for gauge in aibrix.iter().flatten() {
            gauge.inc();
        }
        InFlightMetric { gauge, aibrix }
    }

    pub fn pod_readiness_transition(&self, model: &str, pod: &str, ready: bool) {
        let labels = ReadinessLabels { model: Arc::from(model), pod: Arc::from(pod), ready };
        self.readiness_transitions.get_or_create(&labels).inc();
    }

    /// A wake-up call to a sleeping model's pod ended: `woken` or `failed`.
    pub fn model_wakeup(&self, model: &Arc<str>, outcome: &'static str) {
        self.wakeups.get_or_create(&WakeLabels { model: Arc::clone(model), outcome }).inc();
    }

    /// A request for the adapter `model` routed among pods of `tier`.
    pub fn lora_route(&self, model: &Arc<str>, tier: &'static str) {
        self.lora_tiers.get_or_create(&LoraTierLabels { model: Arc::clone(model), tier }).inc();
    }

    pub fn invalid_config(&self, model: &str) {
        self.invalid_configs.get_or_create(&ModelLabels { model: Arc::from(model) }).inc();
    }

    /// One limit check's outcome. `profile` comes from the model's config
    /// (bounded); user ids are never labels.
    pub fn ratelimit_decision(&self, model: &Arc<str>, profile: &str, limit: &'static str, decision: &'static str) {
        let profile: Arc<str> = Arc::from(profile);
        if decision == "limited" {
            let labels = RejectionLabels { model: Arc::clone(model), profile: Arc::clone(&profile), limit };
            self.ratelimit_rejections.get_or_create(&labels).inc();
        }
        let labels = RateLimitLabels { model: Arc::clone(model), profile, limit, decision };
        self.ratelimit_decisions.get_or_create(&labels).inc();
    }

    /// Makes the per-pod in-flight gauge report `source` (held weakly: the
    /// pod store owns these metrics) from now on.
    pub fn report_pod_in_flight(&self, source: Weak<dyn PodInFlight>) {
        *self.pod_in_flight.source.lock().unwrap_or_else(PoisonError::into_inner) = Some(source);
    }

    pub fn ratelimit_store_latency(&self, op: &'static str, seconds: f64) {
        self.ratelimit_store_latency.get_or_create(&StoreOpLabels { op }).observe(seconds);
    }

    pub fn ratelimit_store_error(&self, op: &'static str, kind: &'static str) {
        self.ratelimit_store_errors.get_or_create(&StoreErrorLabels { op, kind }).inc();
    }

    pub fn ratelimit_breaker_state(&self, value: i64) {
        self.ratelimit_breaker_state.set(value);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Where the per-pod in-flight gauge reads from: the pod store.
pub trait PodInFlight: Send + Sync {
    /// Calls `visit(model, pod key, requests in flight)` for every known pod.
    fn visit(&self, visit: &mut dyn FnMut(&str, &str, i64));
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabels {
    model: String,
    pod: String,
}

const POD_IN_FLIGHT: &str = "aibrix_gateway_pod_in_flight_requests";
const POD_IN_FLIGHT_HELP: &str = "Requests routed to the pod whose response has not ended";

/// `aibrix_gateway_pod_in_flight_requests`, read from the pod store's
/// counters (the ones routing uses) when `/metrics` is scraped.
#[derive(Default)]
struct PodInFlightGauge {
    source: Mutex<Option<Weak<dyn PodInFlight>>>,
}

impl std::fmt::Debug for PodInFlightGauge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PodInFlightGauge")
    }
}

impl prometheus_client::collector::Collector for PodInFlightGauge {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let source = self.source.lock().unwrap_or_else(PoisonError::into_inner).as_ref().and_then(Weak::upgrade);
        let Some(source) = source else { return Ok(()) };
        let mut metric = encoder.encode_descriptor(
            POD_IN_FLIGHT,
            POD_IN_FLIGHT_HELP,
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        let mut result = Ok(());
        source.visit(&mut |model, pod, in_flight| {
            if result.is_ok() {
                result = metric
                    .encode_family(&PodLabels { model: model.to_owned(), pod: pod.to_owned() })
                    .and_then(|family| ConstGauge::new(in_flight).encode(family));
            }
        });
        result
    }
}

/// Decrements the in-flight gauge when dropped.
pub struct InFlightMetric {
    gauge: Gauge,
    /// `gateway_in_flight_requests` and `gateway_model_in_flight_requests`.
    aibrix: Option<[Gauge; 2]>,
}

impl Drop for InFlightMetric {
    fn drop(&mut self) {
        self.gauge.dec();
        for gauge in self.aibrix.iter().flatten() {
            gauge.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request the gateway answered itself: no pod.
    const NO_POD: Option<&Arc<crate::discovery::PodInfo>> = None;

    #[test]
    fn request_counter_renders_with_model_and_status() {
        let metrics = Metrics::new();
        let model: Arc<str> = Arc::from("llama");
        metrics.request_done(&model, NO_POD, 200);
        metrics.request_done(&model, NO_POD, 200);
        metrics.request_done(&Arc::from(UNKNOWN_MODEL), NO_POD, 400);
        let text = metrics.render();
        assert!(text.contains(r#"aibrix_gateway_requests_total{model="llama",status_code="200"} 2"#), "{text}");
        assert!(text.contains(r#"aibrix_gateway_requests_total{model="unknown",status_code="400"} 1"#), "{text}");
    }

    #[test]
    fn rejections_and_per_pod_in_flight_render() {
        #[derive(Debug)]
        struct TwoPods;
        impl PodInFlight for TwoPods {
            fn visit(&self, visit: &mut dyn FnMut(&str, &str, i64)) {
                visit("m", "ns/a", 3);
                visit("m", "ns/b", 0);
            }
        }
        let metrics = Metrics::new();
        let model: Arc<str> = Arc::from("m");
        metrics.ratelimit_decision(&model, "batch", "rps", "allowed");
        metrics.ratelimit_decision(&model, "batch", "rps", "limited");
        metrics.ratelimit_decision(&model, "default", "rpm", "limited");
        assert!(!metrics.render().contains(POD_IN_FLIGHT), "no source, no series");
        let source: Arc<dyn PodInFlight> = Arc::new(TwoPods);
        metrics.report_pod_in_flight(Arc::downgrade(&source));
        let text = metrics.render();
        for line in [
            r#"aibrix_gateway_ratelimit_rejections_total{model="m",profile="batch",limit="rps"} 1"#,
            r#"aibrix_gateway_ratelimit_rejections_total{model="m",profile="default",limit="rpm"} 1"#,
            r#"aibrix_gateway_pod_in_flight_requests{model="m",pod="ns/a"} 3"#,
            r#"aibrix_gateway_pod_in_flight_requests{model="m",pod="ns/b"} 0"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        drop(source);
        assert!(!metrics.render().contains(POD_IN_FLIGHT), "source gone, series gone");
    }

    #[test]
    fn in_flight_gauge_follows_guards() {
        let metrics = Arc::new(Metrics::new());
        let model: Arc<str> = Arc::from("m");
        let a = metrics.in_flight(&model);
        let _b = metrics.in_flight(&model);
        assert!(metrics.render().contains(r#"aibrix_gateway_in_flight_requests{model="m"} 2"#));
        drop(a);
        assert!(metrics.render().contains(r#"aibrix_gateway_in_flight_requests{model="m"} 1"#));
        assert!(metrics.render().contains(r#"gateway_model_in_flight_requests{gateway_pod="",model="m"} 1"#));
    }

    #[test]
    fn aibrix_names_follow_the_config() {
        let model: Arc<str> = Arc::from("m");
        let on = Arc::new(Metrics::with_config(&MetricsConfig { aibrix_names: true, gateway_pod: "gw-0".to_owned() }));
        let off =
            Arc::new(Metrics::with_config(&MetricsConfig { aibrix_names: false, gateway_pod: "gw-0".to_owned() }));
        let mut in_flight = Vec::new();
        for metrics in [&on, &off] {
            metrics.request_done(&model, NO_POD, 200);
            in_flight.push(metrics.in_flight(&model));
            metrics.routing.prefix_match(&model, 1, 2);
        }
        let text = on.render();
        assert!(text.contains(r#"gateway_request_total{gateway_pod="gw-0",model="m",pod_name=""} 1"#), "{text}");
        assert!(text.contains(r#"gateway_in_flight_requests{gateway_pod="gw-0"} 1"#), "{text}");
        assert!(text.contains("aibrix_prefix_cache_routing_decisions_total"), "{text}");
        let text = off.render();
        assert!(text.contains(r#"aibrix_gateway_requests_total{model="m",status_code="200"} 1"#), "{text}");
        for name in ["gateway_", "aibrix_prefix_cache_", "pd_selected_"] {
            assert!(
                !text.lines().any(|l| l.starts_with(name) || l.contains(&format!(" {name}"))),
                "{name} in
{text}"
            );
        }
    }
}
