//! Trace export metrics: spans that reached the collector, and spans lost on
//! the way (the export queue was full, or the collector refused or did not
//! answer). Tracing never waits for the collector, so these counters are how
//! an operator sees that traces are incomplete.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Why a finished span was not exported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanDrop {
    /// The bounded export queue was full (the collector is slower than the
    /// gateway makes spans, or down).
    QueueFull,
    /// The collector refused the batch, or did not answer in time.
    ExportFailed,
}

impl SpanDrop {
    fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::ExportFailed => "export_failed",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

/// Trace export families, registered once at start.
#[derive(Clone, Debug)]
pub struct TraceMetrics {
    exported: Counter,
    dropped: Family<DropLabels, Counter>,
}

impl TraceMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let exported = Counter::default();
        registry.register("turnstile_trace_spans_exported", "Spans the OTLP collector accepted", exported.clone());
        let dropped = Family::default();
        registry.register(
            "turnstile_trace_spans_dropped",
            "Finished spans not exported, by reason: queue_full (the bounded export queue was full), \
             export_failed (the collector refused the batch or did not answer in time)",
            dropped.clone(),
        );
        for reason in [SpanDrop::QueueFull, SpanDrop::ExportFailed] {
            // Both series exist from the start, so an alert on a rate sees zero, not nothing.
            let _ = dropped.get_or_create(&DropLabels { reason: reason.as_str() });
        }
        Self { exported, dropped }
    }

    pub fn exported(&self, spans: u64) {
        self.exported.inc_by(spans);
    }

    pub fn dropped(&self, reason: SpanDrop, spans: u64) {
        self.dropped.get_or_create(&DropLabels { reason: reason.as_str() }).inc_by(spans);
    }
}

#[cfg(test)]
impl TraceMetrics {
    /// Spans exported, dropped on a full queue, dropped by failed exports.
    pub fn counts(&self) -> (u64, u64, u64) {
        let dropped = |reason: SpanDrop| self.dropped.get_or_create(&DropLabels { reason: reason.as_str() }).get();
        (self.exported.get(), dropped(SpanDrop::QueueFull), dropped(SpanDrop::ExportFailed))
    }
}
