//! Hand-written HTTP/1.1 for clients that need their own socket (a chosen source address,
//! exact byte counts), where a pooled client cannot serve.

use std::net::SocketAddr;

/// A `POST path` of a JSON `body` to `host` that asks the server to close the connection
/// after answering, so the whole answer is whatever arrives before EOF.
pub fn post_json_closing(host: SocketAddr, path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The status code of a raw HTTP/1.x response (`None` unless it starts with a status line).
pub fn response_status(response: &[u8]) -> Option<u16> {
    let line = response.strip_prefix(b"HTTP/1.")?;
    let code = line.get(2..5)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_carries_length_and_close() {
        let request = post_json_closing("127.0.0.1:8000".parse().expect("addr"), "/v1/x", "{}");
        assert!(request.starts_with("POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"), "{request}");
        assert!(request.contains("Content-Length: 2\r\nConnection: close\r\n\r\n{}"), "{request}");
    }

    #[test]
    fn status_of_a_response() {
        assert_eq!(response_status(b"HTTP/1.1 429 Too Many Requests\r\n\r\n"), Some(429));
        assert_eq!(response_status(b"HTTP/1.0 200 OK\r\n"), Some(200));
        assert_eq!(response_status(b""), None);
        assert_eq!(response_status(b"SSH-2.0"), None);
    }
}
