//! Defaults of the request path's tunables: the `turnstile serve` flags that
//! feed `ProxySettings`, `UpstreamSettings` and `HttpLimits` take them from
//! here, so each is written once.

/// Largest accepted request body in bytes.
pub const MAX_BODY_BYTES: usize = 8 << 20;
/// Time a client has to send the whole request body, in seconds.
pub const BODY_READ_TIMEOUT_SECONDS: u64 = 30;
/// Time a client has to send the request headers, in seconds.
pub const HEADER_READ_TIMEOUT_SECONDS: u64 = 10;
/// Most header fields in one request.
pub const MAX_HEADERS: usize = 100;
/// Largest request line plus headers in bytes.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Longest request target (path and query) in bytes.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Time to connect to an engine pod, in milliseconds.
pub const UPSTREAM_CONNECT_TIMEOUT_MS: u64 = 2000;
/// Time an engine has to send response headers, in seconds.
pub const UPSTREAM_TIMEOUT_SECONDS: u64 = 300;
/// Most connections to one engine pod.
pub const MAX_CONNECTIONS_PER_POD: usize = 256;
/// Idle engine connections are closed after this many seconds.
pub const UPSTREAM_IDLE_TIMEOUT_SECONDS: u64 = 90;
/// Most requests in flight in the whole gateway.
pub const MAX_IN_FLIGHT: usize = 4096;
/// Most concurrent HTTP/2 streams on one client connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 100;
/// Seconds a client may leave an answer unread before its connection is closed.
pub const CLIENT_WRITE_TIMEOUT_SECONDS: u64 = 60;
/// Pods tried for one request when connecting fails.
pub const MAX_CONNECT_ATTEMPTS: usize = 3;
/// Time a `pd` prefill pod has to answer, in seconds (AIBrix's
/// `AIBRIX_PREFILL_REQUEST_TIMEOUT`).
pub const PREFILL_REQUEST_TIMEOUT_SECONDS: u64 = 30;
