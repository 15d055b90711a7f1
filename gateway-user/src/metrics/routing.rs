//! Routing metrics: strategies that could not score and fell back, prefix
//! cache hits, and how current each pod's engine metrics are.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

const POD_METRICS_AGE: &str = "aibrix_gateway_pod_metrics_age_seconds";
const POD_METRICS_AGE_HELP: &str =
    "Seconds since the pod's engine /metrics was last scraped successfully (pods never scraped are absent)";

/// Where the scrape-age gauge reads from: the engine metrics store.
pub trait PodAges: Send + Sync + std::fmt::Debug {
    /// Calls `visit(model, pod key, age in seconds)` for every scraped pod.
    fn visit(&self, visit: &mut dyn FnMut(&str, &str, f64));
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    strategy: &'static str,
    /// `metrics_missing`, `metrics_stale`, `no_user`, `no_session`, ...
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PrefixLabels {
    model: Arc<str>,
    strategy: &'static str,
    /// `hit` (the chosen pod held a prefix of the prompt) or `miss`.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScrapeErrorLabels {
    model: Arc<str>,
    /// `connect`, `timeout`, `status`, `body`, `parse`, `http`
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabels {
    model: String,
    pod: String,
}

/// Routing families, registered once at start. Clones share the families.
#[derive(Clone, Debug)]
pub struct RoutingMetrics {
    fallbacks: Family<FallbackLabels, Counter>,
    prefix_lookups: Family<PrefixLabels, Counter>,
    scrape_errors: Family<ScrapeErrorLabels, Counter>,
    ages: Arc<AgeGauge>,
    /// AIBrix's `aibrix_prefix_cache_*` names, when exported.
    aibrix: Option<super::AibrixMetrics>,
}

impl RoutingMetrics {
    pub fn register(registry: &mut Registry, aibrix: Option<super::AibrixMetrics>) -> Self {
        let fallbacks = Family::default();
        registry.register(
            "aibrix_gateway_routing_fallbacks",
            "Requests a strategy could not score (its inputs were missing), routed by least-request instead",
            fallbacks.clone(),
        );
        let prefix_lookups = Family::default();
        registry.register(
            "aibrix_gateway_prefix_cache_lookups",
            "Prefix-aware routing decisions: hit when the chosen pod already held a prefix of the prompt",
            prefix_lookups.clone(),
        );
        let scrape_errors = Family::default();
        registry.register(
            "aibrix_gateway_engine_metrics_scrape_errors",
            "Engine /metrics scrapes that failed, by model and kind",
            scrape_errors.clone(),
        );
        let ages = Arc::new(AgeGauge::default());
        registry.register_collector(Box::new(Arc::clone(&ages)));
        Self { fallbacks, prefix_lookups, scrape_errors, ages, aibrix }
    }

    /// A strategy could not score and least-request chose instead.
    pub fn fallback(&self, strategy: &'static str, reason: &'static str) {
        self.fallbacks.get_or_create(&FallbackLabels { strategy, reason }).inc();
    }

    /// A prefix-aware decision: `hit` when the chosen pod held part of the prompt.
    pub fn prefix_lookup(&self, model: &Arc<str>, strategy: &'static str, hit: bool) {
        let labels = PrefixLabels { model: Arc::clone(model), strategy, result: if hit { "hit" } else { "miss" } };
        self.prefix_lookups.get_or_create(&labels).inc();
    }

    /// The prefix-cache strategy chose a pod holding `held_blocks` of the
    /// prompt's `prompt_blocks` prefix blocks (AIBrix's names only).
    pub fn prefix_match(&self, model: &Arc<str>, held_blocks: usize, prompt_blocks: usize) {
        if let Some(aibrix) = &self.aibrix {
            aibrix.prefix_decision(model, held_blocks, prompt_blocks);
        }
    }

    /// A scrape of a pod of `model` failed.
    pub fn scrape_error(&self, model: &str, kind: &'static str) {
        self.scrape_errors.get_or_create(&ScrapeErrorLabels { model: Arc::from(model), kind }).inc();
    }

    /// Makes the scrape-age gauge report `source` from now on.
    pub fn report_pod_ages(&self, source: Arc<dyn PodAges>) {
        *self.ages.source.lock().unwrap_or_else(PoisonError::into_inner) = Some(source);
    }
}

/// `aibrix_gateway_pod_metrics_age_seconds`, computed when `/metrics` is read
/// so a scraper that stalls shows as growing ages rather than frozen ones.
#[derive(Debug, Default)]
struct AgeGauge {
    source: Mutex<Option<Arc<dyn PodAges>>>,
}

impl Collector for AgeGauge {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(source) = self.source.lock().unwrap_or_else(PoisonError::into_inner).clone() else {
            return Ok(());
        };
        let mut metric = encoder.encode_descriptor(POD_METRICS_AGE, POD_METRICS_AGE_HELP, None, MetricType::Gauge)?;
        let mut result = Ok(());
        source.visit(&mut |model, pod, age| {
            if result.is_ok() {
                result = metric
                    .encode_family(&PodLabels { model: model.to_owned(), pod: pod.to_owned() })
                    .and_then(|family| ConstGauge::new(age).encode(family));
            }
        });
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct TwoPods;

    impl PodAges for TwoPods {
        fn visit(&self, visit: &mut dyn FnMut(&str, &str, f64)) {
            visit("m", "ns/a", 0.05);
            visit("m", "ns/b", 3.0);
        }
    }

    fn render(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, registry).expect("encode");
        out
    }

    #[test]
    fn counters_and_ages_render() {
        let mut registry = Registry::default();
        let metrics = RoutingMetrics::register(&mut registry, None);
        assert!(!render(&registry).contains(POD_METRICS_AGE), "no source, no series");
        metrics.fallback("least-kv-cache", "metrics_stale");
        metrics.prefix_lookup(&Arc::from("m"), "prefix-cache", true);
        metrics.prefix_lookup(&Arc::from("m"), "prefix-cache", false);
        metrics.scrape_error("m", "timeout");
        metrics.report_pod_ages(Arc::new(TwoPods));
        let text = render(&registry);
        for line in [
            r#"aibrix_gateway_routing_fallbacks_total{strategy="least-kv-cache",reason="metrics_stale"} 1"#,
            r#"aibrix_gateway_prefix_cache_lookups_total{model="m",strategy="prefix-cache",result="hit"} 1"#,
            r#"aibrix_gateway_prefix_cache_lookups_total{model="m",strategy="prefix-cache",result="miss"} 1"#,
            r#"aibrix_gateway_engine_metrics_scrape_errors_total{model="m",kind="timeout"} 1"#,
            r#"aibrix_gateway_pod_metrics_age_seconds{model="m",pod="ns/a"} 0.05"#,
            r#"aibrix_gateway_pod_metrics_age_seconds{model="m",pod="ns/b"} 3.0"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
