//! The one "request end" line every request ends in, proxied or answered by
//! the gateway itself: the same record and the same fields either way
//! (tokens are zero when no engine answered).

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;

use super::usage::Usage;
use crate::discovery::PodInfo;
use crate::errors::GatewayError;
use crate::kernel::penalties::ClientAddr;
use crate::metrics::UNKNOWN_MODEL;

/// What is known about a request, filled in phase by phase; what a request
/// never reached stays empty.
#[derive(Debug, Clone)]
pub struct AccessRecord {
    pub request_id: HeaderValue,
    pub started: Instant,
    /// The request path as sent (escaped when written).
    pub path: String,
    /// The client the request is accounted to, and the connection's peer.
    pub client: ClientAddr,
    pub peer: SocketAddr,
    pub model: Option<Arc<str>>,
    pub profile: Option<String>,
    /// The strategy resolved (or asked for, when it is unknown).
    pub strategy: Option<Cow<'static, str>>,
    /// The pod chosen, or last tried.
    pub pod: Option<Arc<PodInfo>>,
    pub routing_time: Option<Duration>,
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The answer reached its end.
    Completed,
    /// The gateway answered with an error.
    Error,
    /// The engine broke off mid-answer.
    UpstreamBroken,
    /// The client went away before the answer ended.
    ClientGone,
    /// The client stopped reading for `--client-write-timeout-seconds`.
    ClientStalled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Error => "error",
            Self::UpstreamBroken => "upstream_broken",
            Self::ClientGone => "client_gone",
            Self::ClientStalled => "client_stalled",
        }
    }
}

/// How the request ended, for its line.
#[derive(Debug, Default)]
pub struct Ending<'a> {
    pub status: u16,
    pub outcome: Option<Outcome>,
    /// Tokens of a completed answer.
    pub usage: Option<Usage>,
    /// Arrival to the engine's first byte.
    pub first_byte: Option<Duration>,
    pub error: Option<&'a GatewayError>,
}

impl AccessRecord {
    pub fn new(request_id: HeaderValue, path: &str, client: ClientAddr, peer: SocketAddr) -> Self {
        Self {
            request_id,
            started: Instant::now(),
            path: path.to_owned(),
            client,
            peer,
            model: None,
            profile: None,
            strategy: None,
            pod: None,
            routing_time: None,
        }
    }

    /// The model as logged and counted: `unknown` before it was known.
    pub fn model_label(&self) -> Arc<str> {
        self.model.clone().unwrap_or_else(|| Arc::from(UNKNOWN_MODEL))
    }

    /// Writes the request's "request end" line.
    pub fn write(&self, end: &Ending<'_>) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let usage = end.usage.unwrap_or_default();
        let outcome = end.outcome.unwrap_or(if end.error.is_some() { Outcome::Error } else { Outcome::Completed });
        // Behind a trusted proxy: the forwarded client, and the proxy as `via`.
        let (client, via) = match self.client.behind_proxy {
            true => (self.client.ip.to_string(), Some(self.peer)),
            false => (self.peer.to_string(), None),
        };
        tracing::info!(
            target: "turnstile::access",
            request_id = self.request_id.to_str().unwrap_or(""),
            model = self.model.as_deref().unwrap_or(UNKNOWN_MODEL),
            profile = self.profile.as_deref(),
            strategy = self.strategy.as_deref(),
            pod = self.pod.as_ref().map(|p| p.name.as_str()),
            pod_ip = self.pod.as_ref().map(|p| p.addr_text.as_str()),
            status = end.status,
            outcome = outcome.as_str(),
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            total_tokens = usage.total_tokens,
            routing_ms = self.routing_time.map(ms),
            ttft_ms = end.first_byte.map(ms),
            total_ms = ms(self.started.elapsed()),
            path = %crate::errors::echo(&self.path),
            client,
            via = via.map(tracing::field::display),
            origin = end.error.map(|e| tracing::field::debug(e.origin())),
            error = end.error.map(tracing::field::display),
            "request end"
        );
    }
}
