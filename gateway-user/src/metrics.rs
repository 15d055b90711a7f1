//! Prometheus metrics, registered once at start as typed families.
//!
//! Label values come from bounded sets: model names the gateway discovered
//! (a model a client merely asked for is `unknown`), status codes, strategy
//! names and pod keys. Never user ids or request ids.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

mod discovery;
mod routing;
pub use discovery::{DiscoveryEvent, DiscoveryMetrics};
pub use routing::{PodAges, RoutingMetrics};

/// Model label for requests that never matched a discovered model.
pub const UNKNOWN_MODEL: &str = "unknown";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: Arc<str>,
    status_code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelStrategyLabels {
    model: Arc<str>,
    strategy: Arc<str>,
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
    invalid_configs: Family<ModelLabels, Counter>,
    ratelimit_decisions: Family<RateLimitLabels, Counter>,
    ratelimit_store_latency: HistogramFamily<StoreOpLabels>,
    ratelimit_store_errors: Family<StoreErrorLabels, Counter>,
    ratelimit_breaker_state: Gauge,
    /// Kernel assist's series (`aibrix_gateway_kernel_*`), read at scrape time
    /// from the eBPF maps or userspace tallies once kernel assist has started.
    kernel: LateCollector,
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
    pub fn new() -> Self {
        let mut registry = Registry::default();
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
        let routing = RoutingMetrics::register(&mut registry);
        let invalid_configs = Family::default();
        registry.register(
            "aibrix_gateway_invalid_config",
            "model.aibrix.ai/config annotations ignored because they do not parse",
            invalid_configs.clone(),
        );
        let ratelimit_decisions = Family::default();
        registry.register(
            "aibrix_gateway_ratelimit_decisions",
            "Limit checks by model, profile, limit (rps, rpm, tpm) and decision",
            ratelimit_decisions.clone(),
        );
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
            invalid_configs,
            ratelimit_decisions,
            ratelimit_store_latency,
            ratelimit_store_errors,
            ratelimit_breaker_state,
            kernel,
        }
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

    pub fn request_done(&self, model: &Arc<str>, status_code: u16) {
        self.requests.get_or_create(&RequestLabels { model: Arc::clone(model), status_code }).inc();
    }

    pub fn routed(&self, model: &Arc<str>, strategy: &'static str, seconds: f64) {
        let labels = ModelStrategyLabels { model: Arc::clone(model), strategy: Arc::from(strategy) };
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
        InFlightMetric { gauge }
    }

    pub fn pod_readiness_transition(&self, model: &str, pod: &str, ready: bool) {
        let labels = ReadinessLabels { model: Arc::from(model), pod: Arc::from(pod), ready };
        self.readiness_transitions.get_or_create(&labels).inc();
    }

    pub fn invalid_config(&self, model: &str) {
        self.invalid_configs.get_or_create(&ModelLabels { model: Arc::from(model) }).inc();
    }

    /// One limit check's outcome. `profile` comes from the model's config
    /// (bounded); user ids are never labels.
    pub fn ratelimit_decision(&self, model: &Arc<str>, profile: &str, limit: &'static str, decision: &'static str) {
        let labels = RateLimitLabels { model: Arc::clone(model), profile: Arc::from(profile), limit, decision };
        self.ratelimit_decisions.get_or_create(&labels).inc();
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

/// Decrements the in-flight gauge when dropped.
pub struct InFlightMetric {
    gauge: Gauge,
}

impl Drop for InFlightMetric {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_counter_renders_with_model_and_status() {
        let metrics = Metrics::new();
        let model: Arc<str> = Arc::from("llama");
        metrics.request_done(&model, 200);
        metrics.request_done(&model, 200);
        metrics.request_done(&Arc::from(UNKNOWN_MODEL), 400);
        let text = metrics.render();
        assert!(text.contains(r#"aibrix_gateway_requests_total{model="llama",status_code="200"} 2"#), "{text}");
        assert!(text.contains(r#"aibrix_gateway_requests_total{model="unknown",status_code="400"} 1"#), "{text}");
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
    }
}
