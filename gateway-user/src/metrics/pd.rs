//! Prefill/decode disaggregation (`pd`) metrics: which pods each side picked,
//! how long prefills take, and how often they fail (the seed's "prefill
//! timeout rate" alert).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::aibrix::PodIdentity;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SelectionLabels {
    model: Arc<str>,
    /// Pod name (pods come from discovery: a bounded set).
    pod: Arc<str>,
    /// `prefill` or `decode`.
    role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PrefillErrorLabels {
    model: Arc<str>,
    /// One of [`PrefillErrorReason`].
    reason: &'static str,
}

/// Why a prefill request failed; the `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillErrorReason {
    /// No answer within `AIBRIX_PREFILL_REQUEST_TIMEOUT`.
    Timeout,
    /// The prefill pod could not be reached, or the connection broke.
    Connect,
    /// The prefill pod answered with a non-2xx status.
    Status,
    /// The answer was not a JSON object (or too large).
    BadResponse,
}

impl PrefillErrorReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connect => "connect",
            Self::Status => "status",
            Self::BadResponse => "bad_response",
        }
    }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn prefill_histogram() -> Histogram {
    // 1 ms .. ~65 s: a prefill is one forward pass over the prompt.
    Histogram::new(exponential_buckets(1e-3, 2.0, 17))
}

/// `pd` families, registered once at start. Clones share the families.
#[derive(Clone, Debug)]
pub struct PdMetrics {
    selections: Family<SelectionLabels, Counter>,
    prefill_duration: HistogramFamily<ModelLabels>,
    prefill_errors: Family<PrefillErrorLabels, Counter>,
    /// AIBrix's `pd_selected_*_pod` names, when exported.
    aibrix: Option<super::AibrixMetrics>,
}

impl PdMetrics {
    pub fn register(registry: &mut Registry, aibrix: Option<super::AibrixMetrics>) -> Self {
        let selections = Family::default();
        registry.register(
            "aibrix_gateway_pd_selections",
            "Pods chosen by the pd strategy, by model, pod and role (prefill or decode)",
            selections.clone(),
        );
        let prefill_duration: HistogramFamily<_> = Family::new_with_constructor(prefill_histogram);
        registry.register(
            "aibrix_gateway_pd_prefill_duration_seconds",
            "Time the prefill request of a pd request took, successful or not",
            prefill_duration.clone(),
        );
        let prefill_errors = Family::default();
        registry.register(
            "aibrix_gateway_pd_prefill_errors",
            "Prefill requests that failed or timed out (pd-prefill-request-error); the client got 503",
            prefill_errors.clone(),
        );
        Self { selections, prefill_duration, prefill_errors, aibrix }
    }

    /// The pd strategy sent a request's prefill to `prefill` and its decode to `decode`.
    pub fn selected<P: PodIdentity + 'static>(&self, model: &Arc<str>, prefill: &Arc<P>, decode: &Arc<P>) {
        for (pod, role) in [(prefill, "prefill"), (decode, "decode")] {
            let labels = SelectionLabels { model: Arc::clone(model), pod: Arc::from(pod.name()), role };
            self.selections.get_or_create(&labels).inc();
        }
        if let Some(aibrix) = &self.aibrix {
            aibrix.pd_selected(prefill, decode);
        }
    }

    /// A prefill request ended (either way) after `seconds`.
    pub fn prefill_done(&self, model: &Arc<str>, seconds: f64) {
        self.prefill_duration.get_or_create(&ModelLabels { model: Arc::clone(model) }).observe(seconds);
    }

    /// A prefill request failed.
    pub fn prefill_error(&self, model: &Arc<str>, reason: PrefillErrorReason) {
        let labels = PrefillErrorLabels { model: Arc::clone(model), reason: reason.as_str() };
        self.prefill_errors.get_or_create(&labels).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_render_with_bounded_labels() {
        let mut registry = Registry::default();
        let metrics = PdMetrics::register(&mut registry, None);
        let model: Arc<str> = Arc::from("m");
        let prefill = crate::metrics::aibrix::tests::pod("rs1-prefill-0", "m", Some("prefill"));
        let decode = crate::metrics::aibrix::tests::pod("rs1-decode-0", "m", Some("decode"));
        metrics.selected(&model, &prefill, &decode);
        metrics.prefill_done(&model, 0.01);
        metrics.prefill_error(&model, PrefillErrorReason::Timeout);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).expect("encode");
        for line in [
            r#"aibrix_gateway_pd_selections_total{model="m",pod="rs1-prefill-0",role="prefill"} 1"#,
            r#"aibrix_gateway_pd_selections_total{model="m",pod="rs1-decode-0",role="decode"} 1"#,
            r#"aibrix_gateway_pd_prefill_duration_seconds_count{model="m"} 1"#,
            r#"aibrix_gateway_pd_prefill_errors_total{model="m",reason="timeout"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
