//! The admin listener: health, readiness, metrics, discovered models and
//! endpoints. Kept off the proxy port so probes and scrapes never queue
//! behind client traffic.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::discovery::PodStore;
use crate::errors;
use crate::kernel::KernelAssist;
use crate::limits::{BearerAuth, Limits};
use crate::metrics::Metrics;
use crate::proxy::{json_response, model_response, models_response};

/// Shared state the admin endpoints report on.
pub struct Admin {
    pub store: Arc<PodStore>,
    pub metrics: Arc<Metrics>,
    /// Set on SIGTERM: `/readyz` fails at once so load balancers stop
    /// sending while in-flight requests drain.
    pub draining: AtomicBool,
    /// Kernel assist, whose state `/readyz` details (active or why not).
    pub kernel: Option<Arc<KernelAssist>>,
    /// The proxy's limiter, whose bearer-token rule `/v1/models` shares:
    /// the model list is no more public here than on the proxy port.
    pub limits: Option<Arc<Limits>>,
    /// Further sections of `/readyz` (such as the routing state shared with
    /// the other replicas), each by its name.
    pub details: Vec<(&'static str, ReadinessDetail)>,
    /// Who may read `/debug/*`, which lists every pod's address.
    pub debug: DebugAccess,
}

/// Who may read `/debug/*`. On a host network anything that reaches the
/// node reaches the admin port, so a peer address proves nothing: the
/// listener must be bound to loopback, or the request must carry the admin
/// token.
#[derive(Debug, Default)]
pub struct DebugAccess {
    /// The admin listener is bound to a loopback address.
    pub loopback: bool,
    /// `--admin-token`, as `Authorization: Bearer`.
    pub token: Option<BearerAuth>,
    /// Refusals, logged at most once a minute (a scanner must not fill the log).
    pub refusals: RefusalLog,
}

/// A count of refusals, to be logged now and then rather than one line each.
#[derive(Debug, Default)]
pub struct RefusalLog {
    since_logged: std::sync::atomic::AtomicU64,
    /// When the last line was written, ms since the log was made (0: never).
    logged_at_ms: std::sync::atomic::AtomicU64,
    started: std::sync::OnceLock<std::time::Instant>,
}

impl RefusalLog {
    /// Most one line per this.
    const EVERY: std::time::Duration = std::time::Duration::from_secs(60);

    /// Counts one refusal; returns the count to log when a line is due (the
    /// first refusal, then at most once a minute).
    fn due(&self) -> Option<u64> {
        let now_ms =
            u64::try_from(self.started.get_or_init(std::time::Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX);
        self.due_at(now_ms.max(1))
    }

    /// [`RefusalLog::due`] at `now_ms` (at least 1).
    fn due_at(&self, now_ms: u64) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let count = self.since_logged.fetch_add(1, Relaxed) + 1;
        let last = self.logged_at_ms.load(Relaxed);
        let every = u64::try_from(Self::EVERY.as_millis()).unwrap_or(u64::MAX);
        if last != 0 && now_ms.saturating_sub(last) < every {
            return None;
        }
        if self.logged_at_ms.compare_exchange(last, now_ms, Relaxed, Relaxed).is_err() {
            return None;
        }
        self.since_logged.fetch_sub(count, Relaxed);
        Some(count)
    }
}

impl DebugAccess {
    /// Whether a request with `headers` may read `/debug/*`; the refusal
    /// says why.
    fn check(&self, headers: &http::HeaderMap) -> Result<(), (StatusCode, &'static str)> {
        match &self.token {
            Some(token) if token.allows(headers) => Ok(()),
            _ if self.loopback => Ok(()),
            Some(_) => Err((StatusCode::UNAUTHORIZED, DEBUG_NEEDS_TOKEN)),
            None => Err((StatusCode::FORBIDDEN, DEBUG_OFF)),
        }
    }

    /// What the startup log says of `/debug/*`.
    pub fn describe(&self) -> &'static str {
        match (self.loopback, self.token.is_some()) {
            (true, _) => "served (loopback admin listener)",
            (false, true) => "served with the admin token",
            (false, false) => "off: the admin listener is not on loopback and no --admin-token is set",
        }
    }
}

const DEBUG_NEEDS_TOKEN: &str = "/debug/* needs the admin token: send it as `Authorization: Bearer <token>`";
const DEBUG_OFF: &str = "/debug/* is served only when the admin listener is bound to a loopback address or \
     --admin-token is set";

/// Says the state of one part of the gateway, as a `/readyz` section.
pub type ReadinessDetail = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

impl Admin {
    pub fn new(store: Arc<PodStore>, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            metrics,
            draining: AtomicBool::new(false),
            kernel: None,
            limits: None,
            details: Vec::new(),
            debug: DebugAccess::default(),
        }
    }

    /// Sets who may read `/debug/*` (nobody by default).
    pub fn with_debug_access(mut self, debug: DebugAccess) -> Self {
        self.debug = debug;
        self
    }

    /// Reports kernel assist's state in `/readyz`.
    pub fn with_kernel(mut self, kernel: Arc<KernelAssist>) -> Self {
        self.kernel = Some(kernel);
        self
    }

    /// Adds section `name` to `/readyz`, filled by `detail` on each call.
    pub fn with_detail(mut self, name: &'static str, detail: ReadinessDetail) -> Self {
        self.details.push((name, detail));
        self
    }

    /// Applies the proxy's bearer token (if any) to `/v1/models`.
    pub fn with_limits(mut self, limits: Arc<Limits>) -> Self {
        self.limits = Some(limits);
        self
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Serves one admin request.
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = request.uri().path();
        let method = request.method();
        if path.starts_with("/debug/")
            && let Err((status, message)) = self.debug.check(request.headers())
        {
            if let Some(refused) = self.debug.refusals.due() {
                tracing::info!(path, status = status.as_u16(), refused, "admin: refused /debug requests");
            }
            return debug_refusal(status, message);
        }
        // On loopback without the admin token, the proxy's bearer token (when
        // set) still guards what the proxy's clients may not see.
        let admin_token = self.debug.token.as_ref().is_some_and(|t| t.allows(request.headers()));
        match (path, method) {
            ("/healthz", &Method::GET) => text(StatusCode::OK, "ok\n"),
            ("/readyz", &Method::GET) => self.readiness(),
            ("/metrics", &Method::GET) => {
                let mut response = text(StatusCode::OK, &self.metrics.render());
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(prometheus_client::encoding::prometheus_text::CONTENT_TYPE),
                );
                response
            }
            // What the proxy's clients may not see without the token (the
            // model list, pod addresses) needs it here too; probes and
            // metrics do not.
            (guarded, &Method::GET)
                if (matches!(guarded, "/v1/models" | "/debug/endpoints") || guarded.starts_with("/v1/models/"))
                    && !(admin_token && path.starts_with("/debug/"))
                    && let Some(Err(error)) = self.limits.as_ref().map(|l| l.authorize(request.headers())) =>
            {
                errors::respond(&error.into())
            }
            ("/v1/models", &Method::GET) => models_response(&self.store),
            (path, &Method::GET) if let Some(id) = crate::proxy::model_id(path) => {
                let answer = if self.store.is_synced() {
                    model_response(&self.store, &id)
                } else {
                    Err(errors::GatewayError::PodsNotLoaded)
                };
                answer.unwrap_or_else(|error| errors::respond(&error))
            }
            ("/debug/endpoints", &Method::GET) => self.endpoints(),
            ("/healthz" | "/readyz" | "/metrics" | "/v1/models" | "/debug/endpoints", _) => {
                json_response(StatusCode::METHOD_NOT_ALLOWED, &serde_json::json!({"error": "method not allowed"}))
            }
            _ => json_response(StatusCode::NOT_FOUND, &serde_json::json!({"error": "not found"})),
        }
    }

    fn readiness(&self) -> Response<Full<Bytes>> {
        let synced = self.store.is_synced();
        let draining = self.draining.load(Ordering::Acquire);
        let ready = synced && !draining;
        let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        let mut body = serde_json::json!({
            "ready": ready,
            "discovery": if synced { "synced" } else { "waiting for the first pod list" },
            "draining": draining,
        });
        if let Some(kernel) = &self.kernel {
            body["kernel_assist"] = kernel.readiness();
        }
        for (name, detail) in &self.details {
            body[*name] = detail();
        }
        json_response(status, &body)
    }

    fn endpoints(&self) -> Response<Full<Bytes>> {
        let snapshot = self.store.snapshot();
        let models: serde_json::Map<String, serde_json::Value> = snapshot
            .model_names()
            .into_iter()
            .filter_map(|name| snapshot.model(name))
            .map(|model| {
                let pods: Vec<serde_json::Value> = model
                    .pods
                    .iter()
                    .map(|p| {
                        serde_json::json!({
                            "pod": p.key, "address": p.addr_text, "ready": p.ready,
                            "in_flight": p.load.in_flight(), "engine": p.engine,
                            "roleset": p.roleset, "role": format!("{:?}", p.role).to_lowercase(),
                        })
                    })
                    .collect();
                let body = serde_json::json!({"pods": pods, "has_config": model.config.is_some()});
                (model.name.to_string(), body)
            })
            .collect();
        json_response(StatusCode::OK, &serde_json::Value::Object(models))
    }
}

/// The OpenAI-style error a refused `/debug` request gets.
fn debug_refusal(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let code = if status == StatusCode::UNAUTHORIZED { "admin_token_required" } else { "debug_disabled" };
    let mut response = Response::new(Full::new(errors::error_body(status, message, Some(code), None)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_at_most_once_a_minute() {
        let log = RefusalLog::default();
        assert_eq!(log.due_at(1), Some(1), "the first is logged at once");
        assert!((0..1000).all(|i| log.due_at(2 + i).is_none()), "a scanner's next thousand are only counted");
        assert_eq!(log.due_at(59_999), None, "not before a minute has passed");
        assert_eq!(log.due_at(60_001), Some(1002), "then one line with the count since the last");
        assert_eq!(log.due_at(60_002), None);
    }
}
