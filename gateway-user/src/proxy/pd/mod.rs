//! The `pd` prefill: the first half of a request routed to a prefill/decode
//! pair ([`super::forward`] runs the pair). Prefill on one pod, then decode
//! on another pod of the same roleset, with the bodies the roleset's engine
//! needs ([`engine`]).
//!
//! For vLLM and TensorRT-LLM the prefill runs first and its answer goes
//! into the decode body. SGLang's two requests run side by side (its decode
//! waits for the prefill pod through the bootstrap server); the client's
//! answer is released once the prefill has succeeded, so a prefill that
//! fails ends the decode too instead of leaving it waiting (AIBrix #2289).
//! Either way the decode answer then streams back through the ordinary
//! forward path, so usage, TPM charging, the access log and in-flight
//! counts work as for any request.
//!
//! A prefill that fails or times out is logged as `pd-prefill-request-error`
//! (request id, model, pod), counted, and answered with 503.

pub mod body;
pub mod engine;

use std::time::Instant;

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::{BodyExt, Limited};

pub(super) use body::TopLevel;
pub(super) use engine::BodyError;

use super::forward::Outbound;
use super::upstream::{self, SendError, Upstream};
use super::{Proxy, RequestContext};
use crate::errors::GatewayError;
use crate::kernel::tagging::UpstreamConn;
use crate::metrics::PrefillErrorReason;
use crate::routing::pd::PdPlan;

/// Largest prefill answer read; one generated token takes a few hundred bytes.
const MAX_PREFILL_ANSWER_BYTES: usize = 4 << 20;
/// Most bytes of a failed prefill's answer quoted in the log and the error.
const QUOTED_ANSWER_BYTES: usize = 300;

/// A prefill that did not succeed.
pub(super) struct PrefillFailure {
    reason: PrefillErrorReason,
    pub detail: String,
    /// The connection was refused or never made: nothing reached the pod,
    /// so another prefill pod may be tried.
    pub not_sent: bool,
}

impl PrefillFailure {
    pub(super) fn new(reason: PrefillErrorReason, detail: String) -> Self {
        Self { reason, detail, not_sent: false }
    }
}

/// The two bodies of a pair.
pub(super) struct PairBodies {
    pub prefill: Bytes,
    /// Known before the prefill answers (SGLang, Mooncake, engines without
    /// a handshake); otherwise written from the answer.
    pub decode: Option<Bytes>,
    client: TopLevel,
}

impl<U: Upstream> Proxy<U> {
    /// Writes the prefill body (and the decode body, when it does not wait
    /// for the prefill's answer) for `plan`'s engine.
    pub(super) fn pair_bodies(&self, plan: &PdPlan, send: &Outbound<'_>) -> Result<PairBodies, BodyError> {
        let client = TopLevel::parse(send.body)
            .map_err(|detail| BodyError::Gateway(format!("the request body cannot be rewritten: {detail}")))?;
        let prefill_ip = prefill_ip(plan);
        let bodies = engine::bodies(plan.handshake, &client, send.body, &prefill_ip, self.settings.trt_machine_id)?;
        Ok(PairBodies { prefill: bodies.prefill, decode: bodies.decode, client })
    }

    /// The decode body written from the prefill's `answer`.
    pub(super) fn decode_after(
        &self,
        plan: &PdPlan,
        send: &Outbound<'_>,
        bodies: &PairBodies,
        answer: &[u8],
    ) -> Result<Bytes, PrefillFailure> {
        if let Some(decode) = &bodies.decode {
            return Ok(decode.clone());
        }
        engine::decode_body(plan.handshake, send.endpoint, &bodies.client, send.body, answer, &prefill_ip(plan))
            .map_err(|detail| PrefillFailure::new(PrefillErrorReason::BadResponse, detail))
    }

    /// Sends the prefill request and reads its answer, within the prefill
    /// timeout; the prefill pod counts it in flight meanwhile.
    pub(super) async fn run_prefill(
        &self,
        plan: &PdPlan,
        send: &Outbound<'_>,
        body: Bytes,
        ctx: &RequestContext,
    ) -> Result<Bytes, PrefillFailure> {
        let _prefilling = plan.prefill.load.start();
        let began = Instant::now();
        let timeout = self.settings.prefill_timeout;
        let mut phase = super::forward::engine_phase(ctx, "prefill", &plan.prefill);
        let exchange = self.prefill_exchange(plan, send, body, &ctx.access.request_id, phase.propagation());
        let outcome = tokio::time::timeout(timeout, exchange).await;
        self.metrics.pd.prefill_done(send.model, began.elapsed().as_secs_f64());
        let outcome = outcome.unwrap_or_else(|_| {
            Err(PrefillFailure::new(PrefillErrorReason::Timeout, format!("no answer within {} s", timeout.as_secs())))
        });
        if let Err(failure) = &outcome
            && phase.is_recording()
        {
            phase.fail(failure.reason.as_str(), failure.detail.clone());
        }
        phase.end();
        outcome
    }

    /// Sends the prefill request; returns its answer.
    async fn prefill_exchange(
        &self,
        plan: &PdPlan,
        send: &Outbound<'_>,
        body: Bytes,
        request_id: &HeaderValue,
        propagation: Option<crate::traces::TraceHeaders>,
    ) -> Result<Bytes, PrefillFailure> {
        let failure = PrefillFailure::new;
        let pool = Some(self.kernel.model_id(send.model));
        let request = upstream::build_request(send.parts, body, &plan.prefill, request_id, pool, propagation)
            .map_err(|detail| failure(PrefillErrorReason::Connect, detail))?;
        let response = self.upstream.send(request).await.map_err(|err| match err {
            SendError::Timeout(limit) => {
                failure(PrefillErrorReason::Timeout, format!("no answer within {} s", limit.as_secs()))
            }
            SendError::Connect(detail) => {
                PrefillFailure { reason: PrefillErrorReason::Connect, detail, not_sent: true }
            }
            SendError::Other(detail) => failure(PrefillErrorReason::Connect, detail),
        })?;
        // The prefill's bytes count for the model in kernel assist too.
        if let Some(UpstreamConn(conn)) = response.extensions().get::<UpstreamConn>() {
            self.kernel.tag(conn, send.model);
        }
        let status = response.status();
        let answer = Limited::new(response.into_body(), MAX_PREFILL_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|err| failure(PrefillErrorReason::BadResponse, format!("reading the answer: {err}")))?
            .to_bytes();
        if !status.is_success() {
            let detail = format!("status {}: {}", status.as_u16(), quote(&answer));
            return Err(failure(PrefillErrorReason::Status, detail));
        }
        Ok(answer)
    }

    /// Logs `pd-prefill-request-error`, counts it, and says what the client gets.
    pub(super) fn prefill_failed(
        &self,
        plan: &PdPlan,
        send: &Outbound<'_>,
        failure: PrefillFailure,
        ctx: &RequestContext,
    ) -> GatewayError {
        let PrefillFailure { reason, detail, not_sent: _ } = failure;
        self.metrics.pd.prefill_error(send.model, reason);
        tracing::error!(
            request_id = ctx.access.request_id.to_str().unwrap_or(""),
            model = &**send.model,
            pod = %plan.prefill.name,
            pod_ip = %plan.prefill.addr_text,
            roleset = %plan.roleset,
            engine = plan.handshake.name(),
            reason = reason.as_str(),
            error = %detail,
            "pd-prefill-request-error"
        );
        GatewayError::PrefillFailed { pod: plan.prefill.name.clone(), reason: detail }
    }
}

/// The prefill pod's IP, which engines are told instead of the host name
/// they know themselves by.
fn prefill_ip(plan: &PdPlan) -> String {
    plan.prefill.addr.map(|a| a.ip().to_string()).unwrap_or_default()
}

/// The start of an engine's answer, for logs and error messages.
fn quote(answer: &[u8]) -> String {
    let text = String::from_utf8_lossy(answer);
    let mut end = text.len().min(QUOTED_ANSWER_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut quoted = text[..end].trim().to_owned();
    if end < text.len() {
        quoted.push('…');
    }
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_bounded_on_a_char_boundary() {
        let long = "é".repeat(400);
        let quoted = quote(long.as_bytes());
        assert!(quoted.len() <= QUOTED_ANSWER_BYTES + '…'.len_utf8());
        assert!(quoted.ends_with('…'));
        assert_eq!(quote(b" short "), "short");
    }
}
