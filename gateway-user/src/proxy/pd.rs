//! The `pd` request flow (contract section 7): prefill on one pod, then
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

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http_body_util::{BodyExt, Limited};
use serde_json::{Map, Value};

use super::forward::SendError;
use super::request::Endpoint;
use super::{Proxy, header_value};
use crate::discovery::PodInfo;
use crate::errors::GatewayError;
use crate::kernel::tagging::UpstreamConn;
use crate::metrics::PrefillErrorReason;
use crate::routing::pd::PdPlan;
use crate::routing::{RouteDecision, RouteRequest};

/// Response header naming the pod that ran the prefill.
pub const PREFILL_TARGET_POD: HeaderName = HeaderName::from_static("prefill-target-pod");
/// Response header with the prefill pod's `IP:port`.
pub const PREFILL_TARGET_POD_IP: HeaderName = HeaderName::from_static("prefill-target-pod-ip");

/// Largest prefill answer read; one generated token takes a few hundred bytes.
const MAX_PREFILL_ANSWER_BYTES: usize = 4 << 20;
/// Most bytes of a failed prefill's answer quoted in the log and the error.
const QUOTED_ANSWER_BYTES: usize = 300;

/// Where the client's request goes once its prefill is done.
pub(super) struct DecodeRoute {
    /// The decode pod.
    pub pod: Arc<PodInfo>,
    /// The client's body carrying the prefill's `kv_transfer_params`.
    pub body: Bytes,
    /// `prefill-target-pod` and `prefill-target-pod-ip`.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Arrival to pair chosen (the prefill is not routing).
    pub routing_time: Duration,
}

impl DecodeRoute {
    /// The routing decision for the decode pod, the only candidate left.
    pub fn decision(&self) -> RouteDecision {
        RouteDecision { index: 0, headers: self.headers.clone(), on_usage: None }
    }
}

/// What the proxy needs to send a request.
pub(super) struct PdRequest<'a> {
    pub endpoint: Endpoint,
    pub parts: &'a http::request::Parts,
    pub body: &'a Bytes,
    pub model: &'a Arc<str>,
    pub request_id: &'a HeaderValue,
    pub started: Instant,
}

/// A prefill that did not succeed.
struct PrefillFailure {
    reason: PrefillErrorReason,
    detail: String,
    /// The connection was refused or never made: nothing reached the pod,
    /// so another prefill pod may be tried.
    not_sent: bool,
}

impl Proxy {
    /// Chooses the prefill/decode pair among `candidates` and runs the
    /// prefill; on success the decode pod and body are returned. A prefill
    /// pod that cannot be connected to is left out and the pair chosen again,
    /// up to `--max-connect-attempts` prefill pods.
    pub(super) async fn route_pd(
        &self,
        request: PdRequest<'_>,
        route_request: &RouteRequest<'_>,
        candidates: &[Arc<PodInfo>],
    ) -> Result<DecodeRoute, GatewayError> {
        let pd = self.router.pd();
        // Prefill pods that could not be connected to, and the last such failure.
        let mut refused: Vec<String> = Vec::new();
        let mut last_refusal: Option<(PdPlan, PrefillFailure)> = None;
        let mut routing_time = None;
        loop {
            let remaining: Vec<Arc<PodInfo>>;
            let pods = if refused.is_empty() {
                candidates
            } else {
                remaining = candidates.iter().filter(|p| !refused.contains(&p.key)).cloned().collect();
                &remaining
            };
            let plan = match (pd.plan(route_request, pods), last_refusal.take()) {
                (Ok(plan), _) => plan,
                (Err(none), None) => {
                    return Err(GatewayError::NoPdRoleset {
                        model: request.model.to_string(),
                        prefill: none.prefill,
                        decode: none.decode,
                    });
                }
                // No other complete roleset is left: the refusal is the failure.
                (Err(_), Some((plan, failure))) => return Err(self.prefill_failed(&plan, &request, failure)),
            };
            let routing_time = *routing_time.get_or_insert_with(|| request.started.elapsed());
            self.metrics.pd.selected(request.model, &plan.prefill.name, &plan.decode.name);
            if !matches!(request.endpoint, Endpoint::ChatCompletions | Endpoint::Completions) {
                // Only generation is split; embeddings and responses are served
                // whole by the decode pod.
                let body = request.body.clone();
                return Ok(DecodeRoute { pod: plan.decode, body, headers: Vec::new(), routing_time });
            }
            // The decode pod counts as busy from now, so requests arriving
            // during this prefill spread over the other decode pods.
            let pending_decode = plan.decode.load.start();
            match self.prefill(&plan, &request, pd.prefill_timeout()).await {
                Ok(kv) => {
                    let prefill_ip = plan.prefill.addr.map(|a| a.ip().to_string()).unwrap_or_default();
                    let body = decode_body(request.body, kv, &prefill_ip).map_err(|_| GatewayError::BodyNotJson)?;
                    // The caller takes the decode pod's slot again, with no await in between.
                    drop(pending_decode);
                    let headers = vec![
                        (PREFILL_TARGET_POD, header_value(&plan.prefill.name)),
                        (PREFILL_TARGET_POD_IP, header_value(&plan.prefill.addr_text)),
                    ];
                    return Ok(DecodeRoute { pod: plan.decode, body, headers, routing_time });
                }
                Err(failure) if failure.not_sent && refused.len() + 1 < self.settings.max_connect_attempts => {
                    tracing::warn!(
                        request_id = request.request_id.to_str().unwrap_or(""),
                        pod = %plan.prefill.key,
                        reason = %failure.detail,
                        "connect to prefill pod failed; choosing another pair"
                    );
                    refused.push(plan.prefill.key.clone());
                    last_refusal = Some((plan, failure));
                }
                Err(failure) => return Err(self.prefill_failed(&plan, &request, failure)),
            }
        }
    }

    /// Sends the prefill request; returns the `kv_transfer_params` of its
    /// answer (`None` when the engine sent none).
    async fn prefill(
        &self,
        plan: &PdPlan,
        request: &PdRequest<'_>,
        timeout: Duration,
    ) -> Result<Option<Map<String, Value>>, PrefillFailure> {
        let body = prefill_body(request.body).map_err(|detail| PrefillFailure {
            reason: PrefillErrorReason::BadResponse,
            detail: format!("the request body cannot be rewritten: {detail}"),
            not_sent: false,
        })?;
        let _prefilling = plan.prefill.load.start();
        let began = Instant::now();
        let failure = |reason, detail| PrefillFailure { reason, detail, not_sent: false };
        let exchange = async {
            let response = self
                .upstream
                .send(request.parts, body, &plan.prefill, request.request_id, self.upstream_pool(request.model))
                .await
                .map_err(|err| match err {
                    SendError::Timeout(limit) => {
                        failure(PrefillErrorReason::Timeout, format!("no answer within {} s", limit.as_secs()))
                    }
                    SendError::Connect(detail) => {
                        PrefillFailure { reason: PrefillErrorReason::Connect, detail, not_sent: true }
                    }
                    SendError::Other(detail) => failure(PrefillErrorReason::Connect, detail),
                })?;
            // The prefill's bytes count for the model in kernel assist too.
            if let (Some(kernel), Some(UpstreamConn(conn))) =
                (&self.kernel, response.extensions().get::<UpstreamConn>())
            {
                kernel.tag(conn, request.model);
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
        };
        let outcome = tokio::time::timeout(timeout, exchange).await;
        self.metrics.pd.prefill_done(request.model, began.elapsed().as_secs_f64());
        outcome.unwrap_or_else(|_| {
            Err(failure(PrefillErrorReason::Timeout, format!("no answer within {} s", timeout.as_secs())))
        })
    }

    /// Logs `pd-prefill-request-error`, counts it, and says what the client gets.
    fn prefill_failed(&self, plan: &PdPlan, request: &PdRequest<'_>, failure: PrefillFailure) -> GatewayError {
        let PrefillFailure { reason, detail, not_sent: _ } = failure;
        self.metrics.pd.prefill_error(request.model, reason);
        tracing::error!(
            request_id = request.request_id.to_str().unwrap_or(""),
            model = &**request.model,
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
pub fn prefill_body(body: &[u8]) -> Result<Bytes, String> {
    let mut object = json_object(body)?;
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
pub fn decode_body(body: &Bytes, kv: Option<Map<String, Value>>, prefill_ip: &str) -> Result<Bytes, String> {
    let Some(mut kv) = kv else {
        return Ok(body.clone());
    };
    kv.insert("remote_host".into(), Value::String(prefill_ip.to_owned()));
    let mut object = json_object(body)?;
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
        let body = parse(&prefill_body(client.to_string().as_bytes()).expect("rewritten"));
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
        assert!(prefill_body(b"[1]").is_err());
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
        let decoded = parse(&decode_body(&body, kv, "10.0.0.7").expect("rewritten"));
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
        assert_eq!(decode_body(&body, None, "10.0.0.7").expect("unchanged"), body);
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
