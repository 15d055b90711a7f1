//! What tests ask the engine about the traffic it got: `GET /mock/stats`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::{HeaderMap, Method, Uri};
use serde_json::{Map, Value, json};

use super::request::Endpoint;

/// Inference request counts and the last inference request received.
#[derive(Debug, Default)]
pub struct RequestStats {
    by_endpoint: [AtomicU64; Endpoint::ALL.len()],
    in_flight: AtomicU64,
    metrics_scrapes: AtomicU64,
    last_request: Mutex<Option<RecordedRequest>>,
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

    /// Keeps `request` as the last request received.
    pub fn record(&self, request: RecordedRequest) {
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
        json!({
            "name": name,
            "requests_total": requests_total,
            "by_path": by_path,
            "in_flight": self.in_flight(),
            "metrics_scrapes": self.metrics_scrapes.load(Ordering::Relaxed),
            "last_request": last_request,
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

        drop(second);
        assert_eq!(stats.in_flight(), 0);
    }
}
