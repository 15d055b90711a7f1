//! W3C trace context on the wire: the client's `traceparent`/`tracestate`
//! read with OpenTelemetry's propagator (it validates versions, ids and
//! flags), and the engine's written from a span's context.

use http::{HeaderMap, HeaderValue};
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::SpanContext;
use opentelemetry_sdk::propagation::TraceContextPropagator;

use super::TraceHeaders;

/// The client's headers as the propagator reads them.
struct Incoming<'a>(&'a HeaderMap);

impl Extractor for Incoming<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The client's trace context: a context whose span is the remote parent,
/// or an empty one (a new trace) when it sent none or an invalid one.
pub fn extract(headers: &HeaderMap) -> Context {
    if !headers.contains_key("traceparent") {
        return Context::new();
    }
    TraceContextPropagator::new().extract_with_context(&Context::new(), &Incoming(headers))
}

/// `traceparent` (and `tracestate`, when the trace has one) naming
/// `context`'s span as the parent.
pub fn headers(context: &SpanContext) -> TraceHeaders {
    let traceparent = format!(
        "00-{}-{}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags() & opentelemetry::trace::TraceFlags::SAMPLED
    );
    let state = context.trace_state().header();
    TraceHeaders {
        traceparent: HeaderValue::from_str(&traceparent).unwrap_or_else(|_| HeaderValue::from_static("")),
        tracestate: (!state.is_empty()).then(|| HeaderValue::from_str(&state).ok()).flatten(),
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{TraceContextExt, TraceFlags, TraceId};

    use super::*;

    fn with(traceparent: &str, tracestate: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", HeaderValue::from_str(traceparent).unwrap());
        if let Some(state) = tracestate {
            headers.insert("tracestate", HeaderValue::from_str(state).unwrap());
        }
        headers
    }

    #[test]
    fn a_valid_traceparent_is_the_remote_parent_with_its_state() {
        let cx = extract(&with("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", Some("vendor=abc")));
        let span = cx.span();
        let parent = span.span_context();
        assert!(parent.is_valid() && parent.is_remote() && parent.is_sampled());
        assert_eq!(parent.trace_id(), TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap());
        let out = headers(parent);
        assert_eq!(out.traceparent, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(out.tracestate.unwrap(), "vendor=abc");
    }

    #[test]
    fn malformed_or_missing_traceparents_start_a_new_trace() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            let cx = extract(&with(bad, None));
            assert!(!cx.span().span_context().is_valid(), "{bad:?} was taken as a parent");
        }
        assert!(!extract(&HeaderMap::new()).has_active_span());
    }

    #[test]
    fn an_unsampled_parent_is_written_unsampled() {
        let cx = extract(&with("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", None));
        let span = cx.span();
        assert_eq!(span.span_context().trace_flags(), TraceFlags::default());
        let out = headers(span.span_context());
        assert!(out.traceparent.to_str().unwrap().ends_with("-00"));
        assert!(out.tracestate.is_none());
    }
}
