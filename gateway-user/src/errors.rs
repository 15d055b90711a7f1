//! Every way a request can fail, classified once.
//!
//! Each failure is one [`GatewayError`] variant. Its status, OpenAI-style body,
//! error header and origin are decided here and nowhere else, so the wire
//! format (AIBrix's statuses, OpenAI's error bodies) reads as one table and
//! the proxy only says *what* went wrong. Domain errors (the limits'
//! refusals) become variants here, so they never know the wire.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use crate::limits::LimitError;
use crate::limits::quota::{self, Quota, QuotaUnit};

/// Which side of the gateway a failure came from; used in logs and to decide
/// whether another pod may be tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The client sent something we cannot serve.
    Client,
    /// The gateway has no way to serve it right now (no pods, draining).
    Gateway,
    /// The engine pod failed or timed out.
    Upstream,
}

/// A request failure, before it is turned into a response.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("error processing request body")]
    BodyNotJson,
    #[error("'model' is a required property")]
    ModelMissing,
    #[error("no messages in the request body")]
    NoMessages,
    /// A field the endpoint needs is missing or unusable (AIBrix's checks
    /// and messages, per path).
    #[error("{message}")]
    InvalidField { message: String, param: &'static str },
    #[error("request body exceeds {limit_bytes} bytes")]
    BodyTooLarge { limit_bytes: usize },
    /// An audio path's body is not a multipart form.
    #[error("audio requests must use multipart/form-data content-type")]
    NotMultipart,
    /// A multipart form that cannot be read (AIBrix's messages).
    #[error("{message}")]
    Multipart { message: &'static str, param: Option<&'static str> },
    /// The form's `model` field is not within the part of the upload the
    /// gateway holds before it streams the rest.
    #[error(
        "the form's 'model' field must come within the first {limit_bytes} bytes of the upload; \
         send it before the file"
    )]
    FormModelTooLate { limit_bytes: usize },
    #[error("failed to read the request body: {reason}")]
    BodyRead { reason: String },
    #[error("request body not received within {timeout_seconds} s")]
    BodyTimeout { timeout_seconds: u64 },
    #[error("request target exceeds {limit_bytes} bytes")]
    UriTooLong { limit_bytes: usize },
    #[error("model {model} does not exist")]
    UnknownModel { model: String },
    /// `GET /v1/models/{id}` for a model no pod serves (OpenAI's 404).
    #[error("The model `{model}` does not exist.")]
    ModelNotFound { model: String },
    /// Discovery has not delivered its first pod list (pods file missing or
    /// invalid, first Kubernetes list pending): no model is known yet.
    #[error("the gateway has not loaded its pods yet")]
    PodsNotLoaded,
    #[error("no ready pods for model {model}")]
    NoReadyPods { model: String },
    #[error("incorrect routing strategy {name}")]
    UnknownStrategy { name: String },
    #[error("invalid external-filter {filter:?}: {reason}")]
    InvalidExternalFilter { filter: String, reason: String },
    #[error("upstream {pod} failed before answering: {reason}")]
    UpstreamFailed { pod: String, reason: String },
    #[error("upstream {pod} did not answer within {timeout_seconds} s")]
    UpstreamTimeout { pod: String, timeout_seconds: u64 },
    #[error("unknown request path {path}")]
    UnknownPath { path: String },
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// `--max-in-flight` requests are in flight already.
    #[error("the gateway is at its limit of {limit} requests in flight")]
    Overloaded { limit: usize },
    #[error("Incorrect API key provided")]
    Unauthorized,
    #[error("model: {model} has exceeded RPS: {}", .quota.limit)]
    ModelRpsExceeded { model: String, quota: Quota },
    #[error("user: {user} has exceeded RPM: {}", .quota.limit)]
    UserRpmExceeded { user: String, quota: Quota },
    #[error("user: {user} has exceeded TPM: {}", .quota.limit)]
    UserTpmExceeded { user: String, quota: Quota },
    /// A client behind a trusted proxy kept sending at flood rates after
    /// 429s; it is refused here, never by closing the proxy's connection.
    #[error("client {client} is refused for {}s after sending too many requests past their rate limits", quota::retry_after_seconds(*.wait))]
    ClientPenalised { client: IpAddr, wait: Duration },
    /// The rate-limit store (Redis) failed and the failure mode is closed.
    #[error("rate limit store unavailable")]
    LimitStoreUnavailable,
    /// `--user-limits aibrix`: the user's record could not be read; the
    /// message is AIBrix's (`redis: nil`: there is no record) or the store's
    /// error.
    #[error("{reason}")]
    UserRecordFailed { reason: String, store_failed: bool },
    /// `--user-limits aibrix`: the store failed counting a users-file user.
    #[error("fail to get RPM for user: {user}")]
    UserCounterFailed { user: String },
    /// `--user-limits aibrix`: a streamed chat of a user whose record sets a
    /// TPM does not ask for usage.
    #[error("include usage for stream options not set")]
    StreamUsageRequired,
    /// `pd`: no roleset has both a ready prefill and a ready decode pod.
    #[error(
        "no roleset of model {model} has a ready prefill and a ready decode pod \
         (ready prefill pods: {prefill}, ready decode pods: {decode})"
    )]
    NoPdRoleset { model: String, prefill: usize, decode: usize },
    /// A strategy refused the request (`slo*`: no pod has room, or the
    /// request cannot meet its SLO); `reason` is logged, the client sees
    /// AIBrix's message.
    #[error("error on selecting target pod")]
    RoutingFailed { model: String, reason: String },
    /// `pd`: the prefill request failed or timed out; no decode was sent.
    #[error("prefill request to pod {pod} failed: {reason}")]
    PrefillFailed { pod: String, reason: String },
    /// Every ready pod of the model sleeps (vLLM's sleep mode); `waking`:
    /// one was asked to wake up (`--wake-sleeping-models`).
    #[error("model {model} is sleeping{}", if *.waking { "; retry shortly" } else { "" })]
    ModelSleeping { model: String, waking: bool },
}

/// Most bytes of a client-sent value (model, user, path, strategy, filter)
/// echoed in an error's message, header or log line.
pub const ECHO_MAX_BYTES: usize = 256;

/// A client-sent value as the gateway echoes it: control characters escaped
/// (`\n`, `\u{1b}`: a value can never start a new log line or header), and
/// cut to [`ECHO_MAX_BYTES`] with `...` so a 6 MB model name costs a few
/// hundred bytes to report.
pub fn echo(value: &str) -> String {
    let mut out = String::with_capacity(value.len().min(ECHO_MAX_BYTES + 3));
    for c in value.chars() {
        let before = out.len();
        if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        if out.len() > ECHO_MAX_BYTES {
            out.truncate(before);
            out.push_str("...");
            break;
        }
    }
    out
}

/// The body of every error the gateway itself produces.
#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
}

const TRUE: HeaderValue = HeaderValue::from_static("true");

impl From<LimitError> for GatewayError {
    /// Names from the client (user, model) are echoed escaped and cut.
    fn from(err: LimitError) -> Self {
        match err {
            LimitError::Unauthorized => Self::Unauthorized,
            LimitError::StoreUnavailable => Self::LimitStoreUnavailable,
            LimitError::UserRpm { user, quota } => Self::UserRpmExceeded { user: echo(&user), quota },
            LimitError::UserTpm { user, quota } => Self::UserTpmExceeded { user: echo(&user), quota },
            LimitError::ModelRps { model, quota } => Self::ModelRpsExceeded { model, quota },
            LimitError::UserRecord { reason, store_failed } => Self::UserRecordFailed { reason, store_failed },
            LimitError::UserCounter { user } => Self::UserCounterFailed { user: echo(&user) },
            LimitError::StreamUsageRequired => Self::StreamUsageRequired,
        }
    }
}

impl GatewayError {
    /// The HTTP status this failure answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BodyNotJson
            | Self::ModelMissing
            | Self::NoMessages
            | Self::InvalidField { .. }
            | Self::NotMultipart
            | Self::Multipart { .. }
            | Self::UnknownModel { .. }
            | Self::UnknownStrategy { .. }
            | Self::InvalidExternalFilter { .. }
            | Self::StreamUsageRequired => StatusCode::BAD_REQUEST,
            Self::BodyRead { .. } => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } | Self::FormModelTooLate { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            Self::NoReadyPods { .. }
            | Self::PodsNotLoaded
            | Self::ShuttingDown
            | Self::Overloaded { .. }
            | Self::LimitStoreUnavailable
            | Self::NoPdRoleset { .. }
            | Self::RoutingFailed { .. }
            | Self::ModelSleeping { .. }
            | Self::PrefillFailed { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::ModelRpsExceeded { .. }
            | Self::UserRpmExceeded { .. }
            | Self::UserTpmExceeded { .. }
            | Self::ClientPenalised { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::UpstreamFailed { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::UnknownPath { .. } | Self::ModelNotFound { .. } => StatusCode::NOT_FOUND,
            Self::UserRecordFailed { .. } | Self::UserCounterFailed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// Where the failure came from.
    pub fn origin(&self) -> Origin {
        match self {
            Self::NoReadyPods { .. }
            | Self::PodsNotLoaded
            | Self::ShuttingDown
            | Self::Overloaded { .. }
            | Self::LimitStoreUnavailable
            | Self::RoutingFailed { .. }
            | Self::NoPdRoleset { .. }
            | Self::ModelSleeping { .. }
            | Self::UserRecordFailed { store_failed: true, .. }
            | Self::UserCounterFailed { .. } => Origin::Gateway,
            Self::UpstreamFailed { .. } | Self::UpstreamTimeout { .. } | Self::PrefillFailed { .. } => Origin::Upstream,
            _ => Origin::Client,
        }
    }

    /// What the log says beyond the client's message: why routing failed.
    pub fn logged_reason(&self) -> Option<&str> {
        match self {
            Self::RoutingFailed { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// OpenAI `code` field.
    fn code(&self) -> Option<&'static str> {
        match self {
            Self::UnknownModel { .. } | Self::ModelNotFound { .. } => Some("model_not_found"),
            Self::Unauthorized => Some("invalid_api_key"),
            Self::ModelRpsExceeded { .. }
            | Self::UserRpmExceeded { .. }
            | Self::UserTpmExceeded { .. }
            | Self::ClientPenalised { .. } => Some("rate_limit_exceeded"),
            Self::PodsNotLoaded | Self::RoutingFailed { .. } | Self::ModelSleeping { .. } => {
                Some("service_unavailable")
            }
            Self::LimitStoreUnavailable => Some("service_unavailable"),
            Self::Overloaded { .. } => Some("overloaded"),
            Self::PrefillFailed { .. } => Some("prefill_failed"),
            _ => None,
        }
    }

    /// OpenAI `param` field: the request field at fault, when there is one.
    fn param(&self) -> Option<&'static str> {
        match self {
            Self::ModelMissing | Self::UnknownModel { .. } | Self::ModelNotFound { .. } => Some("model"),
            Self::NoMessages => Some("messages"),
            Self::InvalidField { param, .. } => Some(param),
            Self::Multipart { param, .. } => *param,
            Self::FormModelTooLate { .. } => Some("model"),
            Self::Unauthorized => Some("api_key"),
            Self::StreamUsageRequired => Some("stream_options"),
            _ => None,
        }
    }

    /// The `x-error-*` header that tells a client (or an Envoy in front of
    /// us) which check failed without parsing the body.
    fn header(&self) -> Option<(HeaderName, HeaderValue)> {
        let name = |n: &'static str| HeaderName::from_static(n);
        match self {
            Self::BodyNotJson
            | Self::ModelMissing
            | Self::NoMessages
            | Self::InvalidField { .. }
            | Self::NotMultipart
            | Self::BodyRead { .. } => Some((name("x-error-request-body-processing"), TRUE)),
            Self::Multipart { .. } | Self::FormModelTooLate { .. } => Some((name("x-error-multipart-parsing"), TRUE)),
            // AIBrix echoes the unknown model name; a name that is not a
            // valid header value (it came from the client) degrades to "true".
            Self::UnknownModel { model } | Self::ModelNotFound { model } => {
                Some((name("x-error-no-model-backends"), HeaderValue::from_str(model).unwrap_or(TRUE)))
            }
            Self::NoReadyPods { .. } | Self::NoPdRoleset { .. } | Self::ModelSleeping { .. } => {
                Some((name("x-error-no-model-backends"), TRUE))
            }
            Self::UnknownStrategy { .. } | Self::InvalidExternalFilter { .. } | Self::RoutingFailed { .. } => {
                Some((name("x-error-routing"), TRUE))
            }
            Self::UpstreamFailed { .. } | Self::UpstreamTimeout { .. } | Self::PrefillFailed { .. } => {
                Some((name("x-error-upstream"), TRUE))
            }
            Self::ModelRpsExceeded { .. } => Some((name("x-error-model-rps-exceeded"), TRUE)),
            Self::UserRpmExceeded { .. } => Some((name("x-error-rpm-exceeded"), TRUE)),
            Self::UserTpmExceeded { .. } => Some((name("x-error-tpm-exceeded"), TRUE)),
            Self::UserRecordFailed { .. } => Some((name("x-error-user"), TRUE)),
            // AIBrix's header for a failed RPM read is its RPM refusal header.
            Self::UserCounterFailed { .. } => Some((name("x-error-rpm-exceeded"), TRUE)),
            Self::StreamUsageRequired => Some((
                name("x-error-no-stream-options-include-usage"),
                HeaderValue::from_static("include usage for stream options not set"),
            )),
            Self::LimitStoreUnavailable => Some((name("x-error-ratelimit-unavailable"), TRUE)),
            Self::PodsNotLoaded => Some((name("x-error-no-model-backends"), TRUE)),
            Self::Overloaded { .. } => Some((name("x-error-overloaded"), TRUE)),
            _ => None,
        }
    }

    /// The limit a 429 is about, for its `x-ratelimit-*` headers.
    fn quota(&self) -> Option<(QuotaUnit, &Quota)> {
        match self {
            Self::ModelRpsExceeded { quota, .. } | Self::UserRpmExceeded { quota, .. } => {
                Some((QuotaUnit::Requests, quota))
            }
            Self::UserTpmExceeded { quota, .. } => Some((QuotaUnit::Tokens, quota)),
            _ => None,
        }
    }

    /// How long a client should wait before trying again (`Retry-After`),
    /// for the failures that pass: every 429, and the 503s of a gateway that
    /// is starting, has no ready pod yet, lost its limit store or drains.
    pub fn retry_after(&self) -> Option<Duration> {
        if let Some((_, quota)) = self.quota() {
            return Some(quota.reset);
        }
        match self {
            Self::ClientPenalised { wait, .. } => Some(*wait),
            // AIBrix's wait for a model it wakes (ModelClaim).
            Self::ModelSleeping { waking: true, .. } => Some(Duration::from_secs(10)),
            Self::PodsNotLoaded
            | Self::NoReadyPods { .. }
            | Self::NoPdRoleset { .. }
            | Self::LimitStoreUnavailable
            | Self::Overloaded { .. }
            | Self::ShuttingDown => Some(Duration::from_secs(1)),
            _ => None,
        }
    }
}

/// OpenAI error `type` by status.
pub(crate) fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 404 | 405 | 408 | 413 | 414 | 431 => "invalid_request_error",
        401 => "authentication_error",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        _ => "api_error",
    }
}

/// Builds the OpenAI-style JSON error body for `status` and `message`.
pub fn error_body(status: StatusCode, message: &str, code: Option<&'static str>, param: Option<&'static str>) -> Bytes {
    let envelope = ErrorEnvelope { error: ErrorBody { message, kind: error_type(status), code, param } };
    // Serialising a struct of strings cannot fail; fall back to a fixed body
    // rather than panic if it ever did.
    serde_json::to_vec(&envelope).map(Bytes::from).unwrap_or_else(|_| {
        Bytes::from_static(br#"{"error":{"message":"internal error","type":"api_error","code":null,"param":null}}"#)
    })
}

/// Turns a failure into the response the client sees.
pub fn respond(err: &GatewayError) -> Response<Full<Bytes>> {
    let status = err.status();
    let body = error_body(status, &err.to_string(), err.code(), err.param());
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some((name, value)) = err.header() {
        headers.insert(name, value);
    }
    if let Some((unit, quota)) = err.quota() {
        quota.insert_headers(unit, headers);
    }
    if let Some(wait) = err.retry_after() {
        quota::insert_retry_after(wait, headers);
    }
    // The rest of a too-large or over-limit request's body is only read to
    // be dropped: the connection ends once it is (see `proxy::discard_rest`).
    if matches!(err, GatewayError::BodyTooLarge { .. } | GatewayError::Overloaded { .. }) {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use rstest::rstest;

    /// A refusal by a limit of `limit` whose window resets in `reset_ms`.
    fn refused(limit: u64, reset_ms: u64) -> Quota {
        Quota { limit, remaining: 0, reset: Duration::from_millis(reset_ms) }
    }

    #[test]
    fn limit_refusals_become_their_wire_errors_with_names_echoed() {
        let user = format!("eve\n{}", "x".repeat(1000));
        let quota = refused(3, 500);
        let GatewayError::UserRpmExceeded { user: echoed, quota: q } =
            GatewayError::from(LimitError::UserRpm { user: user.clone(), quota })
        else {
            panic!("user rpm expected")
        };
        assert_eq!((echoed, q), (echo(&user), quota));
        assert!(matches!(
            GatewayError::from(LimitError::UserTpm { user: "bob".into(), quota }),
            GatewayError::UserTpmExceeded { user, .. } if user == "bob"
        ));
        assert!(matches!(
            GatewayError::from(LimitError::ModelRps { model: "m".into(), quota }),
            GatewayError::ModelRpsExceeded { model, .. } if model == "m"
        ));
        assert!(matches!(GatewayError::from(LimitError::Unauthorized), GatewayError::Unauthorized));
        assert!(matches!(GatewayError::from(LimitError::StoreUnavailable), GatewayError::LimitStoreUnavailable));
    }

    async fn parts(err: GatewayError) -> (StatusCode, http::HeaderMap, serde_json::Value) {
        let response = respond(&err);
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.expect("full body").to_bytes();
        (parts.status, parts.headers, serde_json::from_slice(&bytes).expect("json body"))
    }

    #[rstest]
    #[case::not_json(
        GatewayError::BodyNotJson,
        400,
        "error processing request body",
        "x-error-request-body-processing",
        "true"
    )]
    #[case::no_model(
        GatewayError::ModelMissing,
        400,
        "'model' is a required property",
        "x-error-request-body-processing",
        "true"
    )]
    #[case::no_messages(
        GatewayError::NoMessages,
        400,
        "no messages in the request body",
        "x-error-request-body-processing",
        "true"
    )]
    #[case::unknown_model(GatewayError::UnknownModel { model: "m1".into() }, 400, "model m1 does not exist", "x-error-no-model-backends", "m1")]
    #[case::model_not_found(GatewayError::ModelNotFound { model: "m1".into() }, 404, "The model `m1` does not exist.", "x-error-no-model-backends", "m1")]
    #[case::no_pods(GatewayError::NoReadyPods { model: "m1".into() }, 503, "no ready pods for model m1", "x-error-no-model-backends", "true")]
    #[case::bad_strategy(GatewayError::UnknownStrategy { name: "nope".into() }, 400, "incorrect routing strategy nope", "x-error-routing", "true")]
    #[case::bad_filter(GatewayError::InvalidExternalFilter { filter: "a in b".into(), reason: "expected a list".into() }, 400, "invalid external-filter \"a in b\": expected a list", "x-error-routing", "true")]
    #[case::model_rps(GatewayError::ModelRpsExceeded { model: "m1".into(), quota: refused(5, 300) }, 429, "model: m1 has exceeded RPS: 5", "x-error-model-rps-exceeded", "true")]
    #[case::user_rpm(GatewayError::UserRpmExceeded { user: "u".into(), quota: refused(3, 20_000) }, 429, "user: u has exceeded RPM: 3", "x-error-rpm-exceeded", "true")]
    #[case::user_tpm(GatewayError::UserTpmExceeded { user: "u".into(), quota: refused(30, 20_000) }, 429, "user: u has exceeded TPM: 30", "x-error-tpm-exceeded", "true")]
    #[case::not_loaded(
        GatewayError::PodsNotLoaded,
        503,
        "the gateway has not loaded its pods yet",
        "x-error-no-model-backends",
        "true"
    )]
    #[case::penalised(GatewayError::ClientPenalised { client: [10, 0, 0, 7].into(), wait: Duration::from_millis(4_200) }, 429, "client 10.0.0.7 is refused for 5s after sending too many requests past their rate limits", "retry-after", "5")]
    #[case::store_closed(
        GatewayError::LimitStoreUnavailable,
        503,
        "rate limit store unavailable",
        "x-error-ratelimit-unavailable",
        "true"
    )]
    #[case::aibrix_no_record(GatewayError::UserRecordFailed { reason: "redis: nil".into(), store_failed: false }, 500, "redis: nil", "x-error-user", "true")]
    #[case::aibrix_counter(GatewayError::UserCounterFailed { user: "u".into() }, 500, "fail to get RPM for user: u", "x-error-rpm-exceeded", "true")]
    #[case::aibrix_stream_usage(
        GatewayError::StreamUsageRequired,
        400,
        "include usage for stream options not set",
        "x-error-no-stream-options-include-usage",
        "include usage for stream options not set"
    )]
    #[case::upstream(GatewayError::UpstreamFailed { pod: "p".into(), reason: "reset".into() }, 502, "upstream p failed before answering: reset", "x-error-upstream", "true")]
    #[case::routing_failed(GatewayError::RoutingFailed { model: "m1".into(), reason: "load capacity reached".into() }, 503, "error on selecting target pod", "x-error-routing", "true")]
    #[case::no_pd_roleset(GatewayError::NoPdRoleset { model: "m1".into(), prefill: 1, decode: 0 }, 503, "no roleset of model m1 has a ready prefill and a ready decode pod (ready prefill pods: 1, ready decode pods: 0)", "x-error-no-model-backends", "true")]
    #[case::prefill_failed(GatewayError::PrefillFailed { pod: "p".into(), reason: "no answer within 1 s".into() }, 503, "prefill request to pod p failed: no answer within 1 s", "x-error-upstream", "true")]
    #[tokio::test]
    async fn contract_error_table(
        #[case] err: GatewayError,
        #[case] status: u16,
        #[case] message: &str,
        #[case] header: &str,
        #[case] header_value: &str,
    ) {
        let (got_status, headers, body) = parts(err).await;
        assert_eq!(got_status.as_u16(), status);
        assert_eq!(body["error"]["message"], message);
        assert_eq!(headers[header], header_value);
        assert_eq!(headers["content-type"], "application/json");
        let kind = body["error"]["type"].as_str().expect("type");
        assert_eq!(kind, error_type(got_status));
    }

    #[tokio::test]
    async fn unknown_model_carries_openai_code_and_param() {
        let (_, _, body) = parts(GatewayError::UnknownModel { model: "m".into() }).await;
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["param"], "model");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }

    #[tokio::test]
    async fn rate_limit_bodies_are_exactly_the_contract() {
        let (_, _, body) =
            parts(GatewayError::ModelRpsExceeded { model: "my-model".into(), quota: refused(50, 1) }).await;
        assert_eq!(
            body,
            serde_json::json!({"error": {"message": "model: my-model has exceeded RPS: 50", "type": "rate_limit_error",
                "code": "rate_limit_exceeded", "param": null}})
        );
        let (status, _, body) = parts(GatewayError::Unauthorized).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            body,
            serde_json::json!({"error": {"message": "Incorrect API key provided", "type": "authentication_error",
                "code": "invalid_api_key", "param": "api_key"}})
        );
    }

    /// AIBrix's bodies for its user refusals: no code, `stream_options` as
    /// the param of the 400, and no `Retry-After` (nothing says waiting helps).
    #[tokio::test]
    async fn aibrix_user_refusals_are_exactly_aibrix_bodies() {
        let (status, headers, body) =
            parts(GatewayError::from(LimitError::UserRecord { reason: "redis: nil".into(), store_failed: false }))
                .await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(headers.get("retry-after").is_none());
        assert_eq!(
            body,
            serde_json::json!({"error": {"message": "redis: nil", "type": "api_error", "code": null, "param": null}})
        );
        let (_, _, body) = parts(GatewayError::from(LimitError::StreamUsageRequired)).await;
        assert_eq!(
            body,
            serde_json::json!({"error": {"message": "include usage for stream options not set",
                "type": "invalid_request_error", "code": null, "param": "stream_options"}})
        );
    }

    #[rstest]
    #[case::rps(GatewayError::ModelRpsExceeded { model: "m".into(), quota: refused(5, 120) }, "requests", "5", "120ms", "1")]
    #[case::rpm(GatewayError::UserRpmExceeded { user: "u".into(), quota: refused(60, 41_500) }, "requests", "60", "41.5s", "42")]
    #[case::tpm(GatewayError::UserTpmExceeded { user: "u".into(), quota: refused(9000, 3_000) }, "tokens", "9000", "3s", "3")]
    #[tokio::test]
    async fn every_429_says_when_to_come_back(
        #[case] err: GatewayError,
        #[case] unit: &str,
        #[case] limit: &str,
        #[case] reset: &str,
        #[case] retry_after: &str,
    ) {
        let (status, headers, _) = parts(err).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers["retry-after"], retry_after);
        assert_eq!(headers[format!("x-ratelimit-limit-{unit}").as_str()], limit);
        assert_eq!(headers[format!("x-ratelimit-remaining-{unit}").as_str()], "0");
        assert_eq!(headers[format!("x-ratelimit-reset-{unit}").as_str()], reset);
    }

    #[rstest]
    #[case::not_loaded(GatewayError::PodsNotLoaded)]
    #[case::no_pods(GatewayError::NoReadyPods { model: "m".into() })]
    #[case::overloaded(GatewayError::Overloaded { limit: 10 })]
    #[case::store_closed(GatewayError::LimitStoreUnavailable)]
    #[case::draining(GatewayError::ShuttingDown)]
    #[tokio::test]
    async fn passing_unavailability_is_retryable(#[case] err: GatewayError) {
        let (status, headers, body) = parts(err).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers["retry-after"], "1");
        assert_eq!(body["error"]["type"], "overloaded_error");
    }

    #[tokio::test]
    async fn final_answers_carry_no_retry_after() {
        let (_, headers, _) = parts(GatewayError::UnknownModel { model: "m".into() }).await;
        assert!(headers.get("retry-after").is_none());
    }

    #[tokio::test]
    async fn model_name_that_is_no_header_value_still_answers() {
        let (status, headers, _) = parts(GatewayError::UnknownModel { model: "bad\u{7f}name".into() }).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(headers["x-error-no-model-backends"], "true");
    }

    #[test]
    fn echoed_values_are_escaped_and_capped() {
        assert_eq!(echo("plain-model"), "plain-model");
        assert_eq!(echo("m\n2026-12-06T00:00:00Z  INFO forged"), "m\\n2026-12-06T00:00:00Z  INFO forged");
        assert_eq!(echo("a\r\u{1b}[31m\u{2028}b"), "a\\r\\u{1b}[31m\\u{2028}b");
        let huge = "é".repeat(3 << 20);
        let echoed = echo(&huge);
        assert!(echoed.len() <= ECHO_MAX_BYTES + 3, "{}", echoed.len());
        assert!(echoed.ends_with("..."));
        assert!(echoed.starts_with("éé"), "cut on a character boundary");
        let controls = "\n".repeat(1000);
        assert!(echo(&controls).len() <= ECHO_MAX_BYTES + 3);
    }

    #[test]
    fn error_types_follow_status() {
        assert_eq!(error_type(StatusCode::TOO_MANY_REQUESTS), "rate_limit_error");
        assert_eq!(error_type(StatusCode::UNAUTHORIZED), "authentication_error");
        assert_eq!(error_type(StatusCode::SERVICE_UNAVAILABLE), "overloaded_error");
        assert_eq!(error_type(StatusCode::BAD_GATEWAY), "api_error");
    }
}
