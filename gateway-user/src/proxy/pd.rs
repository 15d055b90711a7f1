//! The `pd` prefill: the first half of a request routed to a prefill/decode
//! pair ([`super::forward`] runs the loop). Prefill on one pod, then
//! decode on another pod of the same roleset.
//!
//! The prefill request is the client's body with a one-token budget, no
//! streaming, and vLLM's `kv_transfer_params` asking for a remote decode. Its
//! answer says where the prompt's KV blocks are; those parameters, with
//! `remote_host` set to the prefill pod's IP, go into the client's body for
//! the decode pod. The decode answer then streams back through the ordinary
//! forward path, so usage, TPM charging, the access log and in-flight counts
//! work as for any request.
//!
//! A prefill that fails or times out is logged as `pd-prefill-request-error`
//! (request id, model, pod), counted, and answered with 503; no decode
//! request is sent.

use std::time::Instant;

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::{BodyExt, Limited};
use serde_json::{Map, Value};

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
    fn new(reason: PrefillErrorReason, detail: String) -> Self {
        Self { reason, detail, not_sent: false }
    }
}

impl<U: Upstream> Proxy<U> {
    /// Runs the prefill on `plan`'s prefill pod; returns the body for the
    /// decode pod: the client's, carrying the prefill's KV parameters.
    pub(super) async fn prefill(
        &self,
        plan: &PdPlan,
        send: &Outbound<'_>,
        request_id: &HeaderValue,
    ) -> Result<Bytes, PrefillFailure> {
        // The client's body, parsed once for both rewrites.
        let client = json_object(send.body).map_err(|detail| {
            PrefillFailure::new(
                PrefillErrorReason::BadResponse,
                format!("the request body cannot be rewritten: {detail}"),
            )
        })?;
        let body = prefill_body(client.clone())
            .map_err(|detail| PrefillFailure::new(PrefillErrorReason::BadResponse, detail))?;
        let _prefilling = plan.prefill.load.start();
        let began = Instant::now();
        let timeout = self.settings.prefill_timeout;
        let exchange = self.prefill_exchange(plan, send, body, request_id);
        let outcome = tokio::time::timeout(timeout, exchange).await;
        self.metrics.pd.prefill_done(send.model, began.elapsed().as_secs_f64());
        let kv = outcome.unwrap_or_else(|_| {
            Err(PrefillFailure::new(PrefillErrorReason::Timeout, format!("no answer within {} s", timeout.as_secs())))
        })?;
        let prefill_ip = plan.prefill.addr.map(|a| a.ip().to_string()).unwrap_or_default();
        decode_body(client, send.body, kv, &prefill_ip)
            .map_err(|detail| PrefillFailure::new(PrefillErrorReason::BadResponse, detail))
    }

    /// Sends the prefill request; returns the `kv_transfer_params` of its
    /// answer (`None` when the engine sent none).
    async fn prefill_exchange(
        &self,
        plan: &PdPlan,
        send: &Outbound<'_>,
        body: Bytes,
        request_id: &HeaderValue,
    ) -> Result<Option<Map<String, Value>>, PrefillFailure> {
        let failure = PrefillFailure::new;
        let pool = Some(self.kernel.model_id(send.model));
        let request = upstream::build_request(send.parts, body, &plan.prefill, request_id, pool)
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
        kv_transfer_params(&answer).map_err(|detail| failure(PrefillErrorReason::BadResponse, detail))
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
            reason = reason.as_str(),
            error = %detail,
            "pd-prefill-request-error"
        );
        GatewayError::PrefillFailed { pod: plan.prefill.name.clone(), reason: detail }
    }
}

/// The prefill request's body: the client's, with a one-token budget, no
/// streaming (vLLM refuses `stream_options` without `stream`), and
/// `kv_transfer_params` asking the engine to keep the KV blocks for a
/// remote decode.
pub fn prefill_body(mut object: Map<String, Value>) -> Result<Bytes, String> {
    object.insert("max_tokens".into(), Value::from(1));
    object.insert("max_completion_tokens".into(), Value::from(1));
    object.insert("stream".into(), Value::Bool(false));
    object.remove("stream_options");
    // A minimum above one token would contradict the budget.
    object.remove("min_tokens");
    object.insert(
        "kv_transfer_params".into(),
        serde_json::json!({
            "do_remote_decode": true,
            "do_remote_prefill": false,
            "remote_engine_id": null,
            "remote_block_ids": null,
            "remote_host": null,
            "remote_port": null,
        }),
    );
    serde_json::to_vec(&object).map(Bytes::from).map_err(|e| e.to_string())
}

/// The decode request's body: the client's, carrying the prefill's
/// `kv_transfer_params` with `remote_host` set to the prefill pod's IP (the
/// engine may only know a host name valid inside its own pod). Without
/// parameters the client's body goes unchanged.
pub fn decode_body(
    mut object: Map<String, Value>,
    body: &Bytes,
    kv: Option<Map<String, Value>>,
    prefill_ip: &str,
) -> Result<Bytes, String> {
    let Some(mut kv) = kv else {
        return Ok(body.clone());
    };
    kv.insert("remote_host".into(), Value::String(prefill_ip.to_owned()));
    object.insert("kv_transfer_params".into(), Value::Object(kv));
    serde_json::to_vec(&object).map(Bytes::from).map_err(|e| e.to_string())
}

/// The `kv_transfer_params` object of a prefill answer (`None` when absent or null).
pub fn kv_transfer_params(answer: &[u8]) -> Result<Option<Map<String, Value>>, String> {
    let mut object =
        json_object(answer).map_err(|e| format!("answer is not a JSON object ({e}): {}", quote(answer)))?;
    match object.remove("kv_transfer_params") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(kv)) => Ok(Some(kv)),
        Some(other) => Err(format!("kv_transfer_params is not an object: {other}")),
    }
}

fn json_object(bytes: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err("not an object".to_owned()),
        Err(err) => Err(err.to_string()),
    }
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
    use serde_json::json;

    fn parse(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).expect("json")
    }

    fn prefill_of(body: &[u8]) -> Result<Bytes, String> {
        prefill_body(json_object(body)?)
    }

    fn decode_of(body: &Bytes, kv: Option<Map<String, Value>>, prefill_ip: &str) -> Result<Bytes, String> {
        decode_body(json_object(body)?, body, kv, prefill_ip)
    }

    #[test]
    fn prefill_body_asks_for_one_token_and_a_remote_decode() {
        let client = json!({
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": 200,
            "min_tokens": 5,
            "temperature": 0.5,
        });
        let body = parse(&prefill_of(client.to_string().as_bytes()).expect("rewritten"));
        assert_eq!(body["max_tokens"], 1);
        assert_eq!(body["max_completion_tokens"], 1);
        assert_eq!(body["stream"], false);
        assert!(body.get("stream_options").is_none());
        assert!(body.get("min_tokens").is_none());
        assert_eq!(body["kv_transfer_params"]["do_remote_decode"], true);
        assert_eq!(body["kv_transfer_params"]["do_remote_prefill"], false);
        assert!(body["kv_transfer_params"]["remote_host"].is_null());
        assert_eq!(body["messages"], client["messages"], "the prompt is untouched");
        assert_eq!(body["temperature"], 0.5);
        assert!(prefill_of(b"[1]").is_err());
    }

    #[test]
    fn decode_body_carries_the_prefill_parameters_with_the_pod_ip() {
        let client = json!({"model": "m", "prompt": "once upon", "stream": true, "max_tokens": 50});
        let answer = json!({
            "id": "cmpl-1",
            "choices": [{"text": "a"}],
            "kv_transfer_params": {"do_remote_prefill": true, "do_remote_decode": false,
                "remote_engine_id": "e1", "remote_block_ids": [3, 4], "remote_host": "localhost", "remote_port": 5600},
        });
        let kv = kv_transfer_params(answer.to_string().as_bytes()).expect("parsed");
        let body = Bytes::from(client.to_string());
        let decoded = parse(&decode_of(&body, kv, "10.0.0.7").expect("rewritten"));
        assert_eq!(decoded["kv_transfer_params"]["remote_host"], "10.0.0.7");
        assert_eq!(decoded["kv_transfer_params"]["remote_engine_id"], "e1");
        assert_eq!(decoded["kv_transfer_params"]["remote_block_ids"], json!([3, 4]));
        assert_eq!(decoded["stream"], true, "the client's own request otherwise");
        assert_eq!(decoded["max_tokens"], 50);
        assert_eq!(decoded["prompt"], "once upon");
    }

    #[test]
    fn prefill_answers_without_parameters_leave_the_decode_body_alone() {
        assert_eq!(kv_transfer_params(br#"{"id":"x"}"#), Ok(None));
        assert_eq!(kv_transfer_params(br#"{"kv_transfer_params":null}"#), Ok(None));
        assert!(kv_transfer_params(br#"{"kv_transfer_params":[1]}"#).is_err());
        assert!(kv_transfer_params(b"<html>bad gateway</html>").is_err());
        let body = Bytes::from_static(br#"{"model":"m","prompt":"x"}"#);
        assert_eq!(decode_of(&body, None, "10.0.0.7").expect("unchanged"), body);
    }

    #[test]
    fn quotes_are_bounded_on_a_char_boundary() {
        let long = "é".repeat(400);
        let quoted = quote(long.as_bytes());
        assert!(quoted.len() <= QUOTED_ANSWER_BYTES + '…'.len_utf8());
        assert!(quoted.ends_with('…'));
        assert_eq!(quote(b" short "), "short");
    }
}
