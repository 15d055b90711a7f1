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
    pub path: Arc<str>,
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
            path: Arc::from(path),
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
        let (client, via): (&dyn std::fmt::Display, _) = match self.client.behind_proxy {
            true => (&self.client.ip, Some(self.peer)),
            false => (&self.peer, None),
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
            path = %Echoed(&self.path),
            client = %client,
            via = via.map(tracing::field::display),
            origin = end.error.map(|e| tracing::field::debug(e.origin())),
            error = end.error.map(tracing::field::display),
            reason = end.error.and_then(GatewayError::logged_reason),
            "request end"
        );
    }
}

/// A client-sent value in a log field: as it is when it is short printable
/// ASCII (every proxied path), else as [`crate::errors::echo`] escapes and
/// cuts it.
struct Echoed<'a>(&'a str);

impl std::fmt::Display for Echoed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plain = self.0.len() <= crate::errors::ECHO_MAX_BYTES && self.0.bytes().all(|b| (0x20..0x7f).contains(&b));
        if plain { f.write_str(self.0) } else { f.write_str(&crate::errors::echo(self.0)) }
    }
}

#[cfg(test)]
mod tests {
    use super::Echoed;

    #[test]
    fn logged_paths_are_escaped_and_cut_only_when_they_need_it() {
        assert_eq!(Echoed("/v1/chat/completions").to_string(), "/v1/chat/completions");
        assert_eq!(Echoed("/a\nb\u{1b}").to_string(), crate::errors::echo("/a\nb\u{1b}"));
        let long = "/x".repeat(400);
        assert_eq!(Echoed(&long).to_string(), crate::errors::echo(&long));
        assert!(Echoed(&long).to_string().ends_with("..."));
    }
}
