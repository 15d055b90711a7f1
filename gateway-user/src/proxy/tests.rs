//! The request path in process: the proxy over a fake engine, a pods store
//! and in-process limits, one test per answer a client can get.

use super::*;

#[test]
fn request_id_from_traceparent_or_fresh_uuid() {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        names::TRACEPARENT,
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    assert_eq!(request_id(&headers), "4bf92f3577b34da6a3ce929d0e0e4736");
    headers.insert(
        names::TRACEPARENT,
        HeaderValue::from_static("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
    );
    let fresh = request_id(&headers);
    assert_eq!(fresh.len(), 36, "invalid all-zero trace id replaced by a UUID");
    assert_ne!(request_id(&http::HeaderMap::new()), fresh);
}
