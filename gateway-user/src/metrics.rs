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
    invalid_configs: Family<ModelLabels, Counter>,
}

fn routing_histogram() -> Histogram {
    // 1 µs .. ~16 ms: routing is in-memory work.
    Histogram::new(exponential_buckets(1e-6, 2.0, 15))
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
        let invalid_configs = Family::default();
        registry.register(
            "aibrix_gateway_invalid_config",
            "model.aibrix.ai/config annotations ignored because they do not parse",
            invalid_configs.clone(),
        );
        Self {
            registry,
            requests,
            routing_latency,
            upstream_ttft,
            request_duration,
            in_flight,
            readiness_transitions,
            invalid_configs,
        }
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
