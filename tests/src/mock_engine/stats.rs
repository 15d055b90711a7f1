//! What tests ask the engine about the traffic it got: `GET /mock/stats`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::{HeaderMap, Method, Uri};
use serde_json::{Map, Value, json};

use super::request::Endpoint;

/// Trace contexts kept: the newest, enough for any test's requests, while a benchmark's
/// millions of requests cost a fixed amount of memory.
pub const MAX_TRACE_CONTEXTS: usize = 1024;

/// Inference request counts, the last inference request received and the W3C trace context
/// of the latest ones.
#[derive(Debug, Default)]
pub struct RequestStats {
    by_endpoint: [AtomicU64; Endpoint::ALL.len()],
    in_flight: AtomicU64,
    metrics_scrapes: AtomicU64,
    last_request: Mutex<Option<RecordedRequest>>,
    trace_contexts: Mutex<VecDeque<TraceContext>>,
}

/// The W3C trace context headers of one inference request, so a test can check that the
/// gateway propagates its trace to the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// Request path.
    pub path: String,
    /// The `traceparent` header, if sent.
    pub traceparent: Option<String>,
    /// The `tracestate` header, if sent.
    pub tracestate: Option<String>,
}

impl TraceContext {
    fn of(request: &RecordedRequest) -> Self {
        let header = |name: &str| {
            // A repeated header reads as one comma-joined value, as in `last_request`.
            let values: Vec<String> = request
                .headers
                .get_all(name)
                .iter()
                .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
                .collect();
            (!values.is_empty()).then(|| values.join(","))
        };
        Self {
            path: request.uri.path().to_owned(),
            traceparent: header("traceparent"),
            tracestate: header("tracestate"),
        }
    }

    fn to_json(&self) -> Value {
        json!({"path": self.path, "traceparent": self.traceparent, "tracestate": self.tracestate})
    }
}

/// An inference request as received. The parts are shared buffers, so keeping one costs a
/// header map, not a copy of the body.
#[derive(Debug)]
pub struct RecordedRequest {
    /// Request method.
    pub method: Method,
    /// Request target.
    pub uri: Uri,
    /// Request headers.
    pub headers: HeaderMap,
    /// Request body.
    pub body: Bytes,
}

impl RequestStats {
    /// Counts a request to `endpoint`; it stays in flight until the guard is dropped.
    pub fn enter(self: &Arc<Self>, endpoint: Endpoint) -> InFlight {
        if let Some(count) = self.by_endpoint.get(endpoint.index()) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// Keeps `request` as the last request received, and its trace context.
    pub fn record(&self, request: RecordedRequest) {
        let context = TraceContext::of(&request);
        {
            let mut contexts = self.trace_contexts.lock().unwrap_or_else(PoisonError::into_inner);
            if contexts.len() == MAX_TRACE_CONTEXTS {
                contexts.pop_front();
            }
            contexts.push_back(context);
        }
        let previous = self.last_request.lock().unwrap_or_else(PoisonError::into_inner).replace(request);
        // Freed outside the lock.
        drop(previous);
    }

    /// Counts a `GET /metrics`.
    pub fn scraped(&self) {
        self.metrics_scrapes.fetch_add(1, Ordering::Relaxed);
    }

    /// Inference requests now being handled, queued or streaming.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The `/mock/stats` document for the engine called `name`.
    pub fn to_json(&self, name: &str) -> Value {
        let by_path: Map<String, Value> = Endpoint::ALL
            .into_iter()
            .zip(&self.by_endpoint)
            .map(|(endpoint, count)| (endpoint.path().to_owned(), count.load(Ordering::Relaxed).into()))
            .collect();
        let requests_total: u64 = self.by_endpoint.iter().map(|count| count.load(Ordering::Relaxed)).sum();
        let last_request = self
            .last_request
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map_or(Value::Null, RecordedRequest::to_json);
        let traceparents: Vec<Value> = self
            .trace_contexts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(TraceContext::to_json)
            .collect();
        json!({
            "name": name,
            "requests_total": requests_total,
            "by_path": by_path,
            "in_flight": self.in_flight(),
            "metrics_scrapes": self.metrics_scrapes.load(Ordering::Relaxed),
            "last_request": last_request,
            "traceparents": traceparents,
        })
    }
}

impl RecordedRequest {
    fn to_json(&self) -> Value {
        let mut headers = Map::new();
        for (name, value) in &self.headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            match headers.get_mut(name.as_str()) {
                // Repeated headers read as one comma-joined value, as HTTP defines them.
                Some(Value::String(joined)) => {
                    joined.push_str(", ");
                    joined.push_str(&value);
                }
                _ => {
                    headers.insert(name.as_str().to_owned(), Value::String(value.into_owned()));
                }
            }
        }
        json!({
            "method": self.method.as_str(),
            "path": self.uri.path(),
            "headers": headers,
            "body": serde_json::from_slice::<Value>(&self.body).unwrap_or(Value::Null),
        })
    }
}

/// An inference request being handled; dropping it (answer done, stream ended or client
/// gone) ends it.
#[derive(Debug)]
pub struct InFlight(Arc<RequestStats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn counts_in_flight_and_keeps_the_last_request() {
        let stats = Arc::new(RequestStats::default());
        let first = stats.enter(Endpoint::ChatCompletions);
        let second = stats.enter(Endpoint::Embeddings);
        drop(first);

        let mut headers = HeaderMap::new();
        headers.insert("X-Request-Id", HeaderValue::from_static("r1"));
        headers.append("accept", HeaderValue::from_static("a"));
        headers.append("accept", HeaderValue::from_static("b"));
        stats.record(RecordedRequest {
            method: Method::POST,
            uri: Uri::from_static("/v1/embeddings?x=1"),
            headers,
            body: Bytes::from_static(br#"{"input":"hi"}"#),
        });

        let json = stats.to_json("pod-a");
        assert_eq!(json["name"], "pod-a");
        assert_eq!(json["requests_total"], 2);
        assert_eq!(json["by_path"]["/v1/chat/completions"], 1);
        assert_eq!(json["by_path"]["/v1/responses"], 0);
        assert_eq!(json["in_flight"], 1);
        assert_eq!(json["last_request"]["path"], "/v1/embeddings");
        assert_eq!(json["last_request"]["headers"]["x-request-id"], "r1");
        assert_eq!(json["last_request"]["headers"]["accept"], "a, b");
        assert_eq!(json["last_request"]["body"]["input"], "hi");
        assert_eq!(json["traceparents"], json!([{"path": "/v1/embeddings", "traceparent": null, "tracestate": null}]));

        drop(second);
        assert_eq!(stats.in_flight(), 0);
    }

    #[test]
    fn keeps_the_latest_trace_contexts() {
        let stats = RequestStats::default();
        let traced = |n: usize| {
            let mut headers = HeaderMap::new();
            let traceparent = format!("00-{n:032x}-00f067aa0ba902b7-01");
            headers.insert("traceparent", HeaderValue::from_str(&traceparent).expect("header"));
            headers.insert("tracestate", HeaderValue::from_static("vendor=1"));
            RecordedRequest {
                method: Method::POST,
                uri: Uri::from_static("/v1/completions"),
                headers,
                body: Bytes::new(),
            }
        };
        for n in 0..MAX_TRACE_CONTEXTS + 5 {
            stats.record(traced(n));
        }
        let json = stats.to_json("pod-a");
        let contexts = json["traceparents"].as_array().expect("an array");
        assert_eq!(contexts.len(), MAX_TRACE_CONTEXTS);
        assert_eq!(contexts[0]["traceparent"], format!("00-{:032x}-00f067aa0ba902b7-01", 5));
        assert_eq!(contexts[0]["tracestate"], "vendor=1");
        assert_eq!(contexts[0]["path"], "/v1/completions");
        let last = &contexts[MAX_TRACE_CONTEXTS - 1]["traceparent"];
        assert_eq!(*last, format!("00-{:032x}-00f067aa0ba902b7-01", MAX_TRACE_CONTEXTS + 4));
    }
}
