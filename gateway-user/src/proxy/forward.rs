//! Routing and forwarding, in one connect-retry loop: the strategy routes
//! the request (to one pod, or to a prefill/decode pair), the request is
//! sent, and a pod that refuses the connection (nothing reached it) is left
//! out and the request routed again among the rest, up to
//! `--max-connect-attempts` pods. A `pd` route runs its prefill first; a
//! prefill pod that refuses is left out the same way.
//!
//! The request's quota is committed once it goes to the pod that answers;
//! a request that never gets there gives it back before its error goes out.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http::Response;
use http::header::{HeaderName, HeaderValue};

use super::body::Held;
use super::form::Upload;
use super::pd::{BodyError, PairBodies, PrefillFailure};
use super::request::{self, Endpoint};
use super::upstream::{self, SendError, Upstream, UpstreamBody};
use super::{ConnectionSlot, Proxy, RequestContext, Resolved, header_value};
use crate::discovery::{InFlightGuard, PodInfo, Role};
use crate::errors::GatewayError;
use crate::kernel::tagging::UpstreamConn;
use crate::limits::{Admission, TokenCharge, UserQuotas};
use crate::metrics::{InFlightMetric, PrefillErrorReason};
use crate::routing::pd::{Handshake, PdPlan, PdRefusal};
use crate::routing::{PromptSource, Route, RouteRequest, Unroutable, UsageCallback};
use crate::traces::{Phase, attr};
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;

/// Response header naming the pod that ran the prefill.
pub const PREFILL_TARGET_POD: HeaderName = HeaderName::from_static("prefill-target-pod");
/// Response header with the prefill pod's `IP:port`.
pub const PREFILL_TARGET_POD_IP: HeaderName = HeaderName::from_static("prefill-target-pod-ip");

/// A request the answering pod has taken: its answer's head, and what the
/// request holds until the answer ends.
pub(super) struct Forwarded<B> {
    pub response: Response<B>,
    pub pod: Arc<PodInfo>,
    /// Response headers routing adds (`x-session-id`, `prefill-target-pod`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub on_usage: Option<UsageCallback>,
    pub held: Held,
    pub charge: Option<TokenCharge>,
    pub quotas: UserQuotas,
    /// The gateway asked the engine for a usage chunk the client did not.
    pub hide_usage_chunk: bool,
    /// The engine exchange's span, open until the answer ends.
    pub trace: Phase,
}

/// Why one attempt failed.
pub(super) enum Failed {
    /// Nothing reached the pod: another may be tried.
    Refused(Refusal),
    /// The request may have reached an engine, or cannot be sent at all.
    Final(GatewayError),
}

/// A pod that could not be connected to.
pub(super) enum Refusal {
    /// The answering pod.
    Pod { pod: Arc<PodInfo>, reason: String },
    /// A `pd` route's prefill pod.
    Prefill { plan: PdPlan, failure: PrefillFailure },
    /// The engine answered 404 for a LoRA adapter it no longer serves
    /// (unloaded since its `/v1/models` was last read): it did no work.
    Unserved { pod: Arc<PodInfo> },
}

impl Refusal {
    fn pod_key(&self) -> &str {
        match self {
            Self::Pod { pod, .. } | Self::Unserved { pod } => &pod.key,
            Self::Prefill { plan, .. } => &plan.prefill.key,
        }
    }
}

/// The request's quota: held until the request goes to the answering pod.
struct Quota {
    pending: Option<Admission>,
    charge: Option<TokenCharge>,
    quotas: UserQuotas,
}

impl Quota {
    fn commit(&mut self) {
        if let Some(admission) = self.pending.take() {
            self.charge = admission.commit();
        }
    }
}

/// The pieces of one attempt that do not change between attempts.
pub(super) struct Outbound<'a> {
    pub parts: &'a http::request::Parts,
    pub strategy: &'static str,
    pub endpoint: Endpoint,
    pub body: &'a Bytes,
    /// An upload streaming from the client: sent instead of `body`.
    pub upload: Option<&'a Upload>,
    pub model: &'a Arc<str>,
    /// A LoRA adapter routed by affinity (not `pd`): an engine's 404 sends
    /// the request on to another pod.
    pub adapter: bool,
}

impl Outbound<'_> {
    /// The body one attempt sends.
    fn attempt_body(&self) -> UpstreamBody {
        match self.upload {
            Some(upload) => upload.body().into(),
            None => self.body.clone().into(),
        }
    }
}

impl<U: Upstream> Proxy<U> {
    /// Routes the request and sends it, moving on from pods that refuse the
    /// connection.
    pub(super) async fn forward(
        &self,
        parts: &http::request::Parts,
        prepared: &super::offload::Prepared,
        resolved: &Resolved,
        admission: Admission,
        ctx: &mut RequestContext,
    ) -> Result<Forwarded<U::Body>, GatewayError> {
        let parsed = &prepared.request;
        // A stream that does not ask for usage is sent asking for it, so its
        // tokens are counted; the client never sees the extra chunk.
        let asked = request::ask_for_usage(parsed);
        let hide_usage_chunk = asked.is_some();
        let body = asked.unwrap_or_else(|| parsed.body.clone());
        let prompt = || parsed.prompt();
        let route_request = self.route_request(parts, prepared, resolved, &prompt);
        let send = Outbound {
            parts,
            strategy: resolved.strategy.name(),
            endpoint: parsed.endpoint,
            body: &body,
            upload: prepared.upload.as_ref(),
            model: &resolved.model_name,
            adapter: resolved.model.parent.is_some() && resolved.strategy.name() != crate::routing::pd::NAME,
        };
        let quotas = admission.user_quotas();
        let mut quota = Quota { pending: Some(admission), charge: None, quotas };
        let result = self.route_and_send(&send, resolved, &route_request, &mut quota, ctx).await;
        if let Some(admission) = quota.pending.take() {
            // Never reached an answering pod: the quota goes back first.
            admission.release().await;
        }
        let mut forwarded = result?;
        forwarded.charge = quota.charge.take();
        forwarded.quotas = quota.quotas;
        forwarded.hide_usage_chunk = hide_usage_chunk;
        Ok(forwarded)
    }

    fn route_request<'a>(
        &self,
        parts: &'a http::request::Parts,
        prepared: &'a super::offload::Prepared,
        resolved: &'a Resolved,
        prompt: &'a PromptSource<'a>,
    ) -> RouteRequest<'a> {
        let profile = resolved.model.config.as_deref().and_then(|c| c.profiles.get(&resolved.profile));
        let request = RouteRequest::new(&resolved.model_name, &prepared.request.body)
            .with_headers(&parts.headers)
            .with_metrics(self.engine_metrics.view())
            .with_prompt_source(prompt)
            .with_prompt_tokens(prepared.prompt_tokens)
            .with_profile(&resolved.profile, profile);
        match &prepared.prefix_hashes {
            Some(hashes) => request.with_prefix_hashes(hashes.clone()),
            None => request,
        }
    }

    /// The connect-retry loop.
    async fn route_and_send(
        &self,
        send: &Outbound<'_>,
        resolved: &Resolved,
        route_request: &RouteRequest<'_>,
        quota: &mut Quota,
        ctx: &mut RequestContext,
    ) -> Result<Forwarded<U::Body>, GatewayError> {
        let candidates = self.awake(resolved.candidates(), route_request, send)?;
        let mut refused: Vec<Refusal> = Vec::new();
        // Adapter 404s cost the engine nothing: they have a budget of their own.
        let mut unserved = 0;
        // A LoRA adapter's requests go to the pods of its best tier.
        let lora = send.adapter;
        loop {
            let mut left = remaining(&candidates, &refused);
            let mut tier = None;
            if lora {
                let (pods, best) = super::lora::best_tier(left, send.model, &route_request.metrics);
                (left, tier) = (pods, Some(best));
            }
            let mut phase = ctx.phase("route", SpanKind::Internal);
            let routed = self.router.route(resolved.strategy.as_ref(), route_request, &left);
            if phase.is_recording() {
                trace_route(&mut phase, &routed, send.strategy);
            }
            phase.end();
            let route = match routed {
                Ok(route) => route,
                // `slo*`: no pod has room yet; wait (bounded, no lock held), then route again.
                Err(Unroutable::Queued(wait)) => {
                    wait.wait().await;
                    continue;
                }
                // Nothing left after a refusal: the refusal is the failure.
                Err(_) if !refused.is_empty() => return Err(self.give_up(refused.pop(), send, ctx)),
                Err(unroutable) => return Err(unroutable_error(unroutable, send.model)),
            };
            // Arrival to the first route (a pd prefill is not routing): counted
            // once the request goes to the pod that answers.
            if ctx.first_route.is_none()
                && let Some(tier) = tier
            {
                self.metrics.lora_route(send.model, tier.label());
            }
            ctx.first_route.get_or_insert_with(|| ctx.access.started.elapsed());
            match self.attempt(route, send, quota, ctx).await {
                Ok(forwarded) => return Ok(forwarded),
                Err(Failed::Final(error)) => return Err(error),
                Err(Failed::Refused(refusal @ Refusal::Unserved { .. })) if unserved < MAX_UNSERVED => {
                    unserved += 1;
                    log_refusal(&refusal, ctx);
                    refused.push(refusal);
                }
                Err(Failed::Refused(refusal))
                    if !matches!(refusal, Refusal::Unserved { .. })
                        && refused.len() - unserved + 1 < self.settings.max_connect_attempts =>
                {
                    log_refusal(&refusal, ctx);
                    refused.push(refusal);
                }
                Err(Failed::Refused(refusal)) => return Err(self.give_up(Some(refusal), send, ctx)),
            }
        }
    }

    /// The candidates whose engines do not say they sleep. When every one
    /// sleeps (for `pd`: every prefill or every decode pod), 503, after
    /// asking one to wake up (`--wake-sleeping-models`).
    fn awake<'a>(
        &self,
        candidates: Cow<'a, [Arc<PodInfo>]>,
        route_request: &RouteRequest<'_>,
        send: &Outbound<'_>,
    ) -> Result<Cow<'a, [Arc<PodInfo>]>, GatewayError> {
        let view = &route_request.metrics;
        if !view.any_sleeping() || !candidates.iter().any(|p| view.sleeping(&p.key)) {
            return Ok(candidates);
        }
        let (asleep, awake): (Vec<Arc<PodInfo>>, Vec<Arc<PodInfo>>) =
            candidates.iter().cloned().partition(|p| view.sleeping(&p.key));
        // The groups that must have an awake pod: the whole model, or each
        // half of a `pd` pair.
        let groups: &[(&str, Option<Role>)] = if send.strategy == crate::routing::pd::NAME {
            &[("prefill", Some(Role::Prefill)), ("decode", Some(Role::Decode))]
        } else {
            &[("", None)]
        };
        let in_group = |role: Option<Role>, pod: &PodInfo| role.is_none_or(|r| pod.role == r);
        let mut waking = false;
        let mut all_asleep = false;
        for &(group, role) in groups {
            if awake.iter().any(|p| in_group(role, p)) {
                continue;
            }
            let sleeping: Vec<Arc<PodInfo>> = asleep.iter().filter(|p| in_group(role, p)).cloned().collect();
            if sleeping.is_empty() {
                continue;
            }
            all_asleep = true;
            waking |= self.waker.wake(send.model, group, &sleeping);
        }
        if all_asleep {
            return Err(GatewayError::ModelSleeping { model: send.model.to_string(), waking });
        }
        Ok(Cow::Owned(awake))
    }

    /// Sends the request along one route.
    async fn attempt(
        &self,
        route: Route,
        send: &Outbound<'_>,
        quota: &mut Quota,
        ctx: &mut RequestContext,
    ) -> Result<Forwarded<U::Body>, Failed> {
        match route {
            Route::Single { pod, decision } => {
                // Counted in flight at once, so the next request's strategy
                // sees it (no window between choosing a pod and counting it).
                let guard = pod.load.start();
                ctx.routed(&self.metrics, send);
                let body = send.attempt_body();
                let mut forwarded = self.send_to(pod, guard, body, send, quota, ctx).await?;
                forwarded.headers = decision.headers;
                forwarded.on_usage = decision.on_usage;
                Ok(forwarded)
            }
            Route::Disaggregated(plan) => self.attempt_pd(plan, send, quota, ctx).await,
        }
    }

    /// A `pd` route: the prefill (for generation), then the decode pod
    /// answers with what the prefill left for it in its body.
    async fn attempt_pd(
        &self,
        plan: PdPlan,
        send: &Outbound<'_>,
        quota: &mut Quota,
        ctx: &mut RequestContext,
    ) -> Result<Forwarded<U::Body>, Failed> {
        self.metrics.pd.selected(send.model, &plan.prefill, &plan.decode);
        // The decode pod counts as busy from now, so requests arriving
        // during this prefill spread over the other decode pods.
        let guard = plan.decode.load.start();
        // Only generation is split; embeddings and responses are served
        // whole by the decode pod.
        if !matches!(send.endpoint, Endpoint::ChatCompletions | Endpoint::Completions) {
            ctx.routed(&self.metrics, send);
            let decode = Arc::clone(&plan.decode);
            return self.send_to(decode, guard, send.attempt_body(), send, quota, ctx).await;
        }
        let bodies = match self.pair_bodies(&plan, send) {
            Ok(bodies) => bodies,
            Err(BodyError::Client(error)) => return Err(Failed::Final(error)),
            Err(BodyError::Gateway(detail)) => {
                let failure = PrefillFailure::new(PrefillErrorReason::BadResponse, detail);
                return Err(Failed::Final(self.prefill_failed(&plan, send, failure, ctx)));
            }
        };
        let prefill_pod = vec![
            (PREFILL_TARGET_POD, header_value(&plan.prefill.name)),
            (PREFILL_TARGET_POD_IP, header_value(&plan.prefill.addr_text)),
        ];
        let forwarded = if let Handshake::Sglang { .. } = plan.handshake {
            self.pair_side_by_side(plan, bodies, guard, send, quota, ctx).await?
        } else {
            let answer = match self.run_prefill(&plan, send, bodies.prefill.clone(), ctx).await {
                Ok(answer) => answer,
                Err(failure) if failure.not_sent => return Err(Failed::Refused(Refusal::Prefill { plan, failure })),
                Err(failure) => return Err(Failed::Final(self.prefill_failed(&plan, send, failure, ctx))),
            };
            let body = match self.decode_after(&plan, send, &bodies, &answer) {
                Ok(body) => body,
                Err(failure) => return Err(Failed::Final(self.prefill_failed(&plan, send, failure, ctx))),
            };
            ctx.routed(&self.metrics, send);
            let decode = Arc::clone(&plan.decode);
            match self.send_to(decode, guard, body.into(), send, quota, ctx).await {
                Ok(forwarded) => forwarded,
                // The prefill is done (its KV blocks wait for this pod): another
                // pair would prefill again, so a refusing decode pod is final.
                Err(Failed::Refused(Refusal::Pod { pod, reason })) => {
                    return Err(Failed::Final(SendError::Connect(reason).into_gateway_error(&pod)));
                }
                Err(failed) => return Err(failed),
            }
        };
        Ok(Forwarded { headers: prefill_pod, ..forwarded })
    }

    /// SGLang: the prefill and the decode go out together (the decode pod
    /// fetches the KV blocks through the prefill pod's bootstrap server, and
    /// the prefill may wait for it), once the decode pod has a connection
    /// slot, so the prefill's time is not spent queueing for it. The
    /// decode's answer goes to the client once the prefill has succeeded
    /// (an error answer at once); a prefill that fails ends the decode, and
    /// the client gets the prefill's 503. The quota is committed only when
    /// the decode's answer goes out.
    async fn pair_side_by_side(
        &self,
        plan: PdPlan,
        bodies: PairBodies,
        guard: InFlightGuard,
        send: &Outbound<'_>,
        quota: &mut Quota,
        ctx: &mut RequestContext,
    ) -> Result<Forwarded<U::Body>, Failed> {
        enum Outcome<B> {
            Answered(Box<Forwarded<B>>),
            PrefillFailed(PrefillFailure),
            DecodeFailed(Failed),
        }
        let decode_body = bodies.decode.clone().unwrap_or_else(|| send.body.clone());
        ctx.routed(&self.metrics, send);
        let (gauge, connection) = self.take_slot(&plan.decode, send, ctx).await?;
        let held = Held { pod: Some(guard), gauge: Some(gauge), connection: Some(connection), gateway: None };
        let outcome = {
            let prefill = self.run_prefill(&plan, send, bodies.prefill.clone(), ctx);
            let decode = self.send_on(Arc::clone(&plan.decode), held, decode_body.into(), send, quota.quotas, ctx);
            tokio::pin!(prefill, decode);
            let mut prefilled = false;
            let mut answered = None;
            loop {
                tokio::select! {
                    result = &mut prefill, if !prefilled => match result {
                        Ok(_) => {
                            prefilled = true;
                            if let Some(forwarded) = answered.take() {
                                break Outcome::Answered(Box::new(forwarded));
                            }
                        }
                        Err(failure) => break Outcome::PrefillFailed(failure),
                    },
                    result = &mut decode, if answered.is_none() => match result {
                        // An engine error needs no KV blocks: it goes out at once.
                        Ok(forwarded) if prefilled || !forwarded.response.status().is_success() => {
                            break Outcome::Answered(Box::new(forwarded));
                        }
                        Ok(forwarded) => answered = Some(forwarded),
                        Err(failed) => break Outcome::DecodeFailed(failed),
                    },
                    // Not reached: one of the two is always pending.
                    else => break Outcome::DecodeFailed(Failed::Final(GatewayError::NoReadyPods { model: send.model.to_string() })),
                }
            }
        };
        match outcome {
            Outcome::Answered(forwarded) => {
                quota.commit();
                Ok(*forwarded)
            }
            // Nothing reached the prefill pod: the decode went too, and a new pair may be tried.
            Outcome::PrefillFailed(failure) if failure.not_sent => {
                Err(Failed::Refused(Refusal::Prefill { plan, failure }))
            }
            Outcome::PrefillFailed(failure) => Err(Failed::Final(self.prefill_failed(&plan, send, failure, ctx))),
            Outcome::DecodeFailed(failed) => Err(failed),
        }
    }

    /// Sends the request to the pod that answers it.
    async fn send_to(
        &self,
        pod: Arc<PodInfo>,
        guard: InFlightGuard,
        body: UpstreamBody,
        send: &Outbound<'_>,
        quota: &mut Quota,
        ctx: &mut RequestContext,
    ) -> Result<Forwarded<U::Body>, Failed> {
        quota.commit();
        let (gauge, connection) = self.take_slot(&pod, send, ctx).await?;
        let held = Held { pod: Some(guard), gauge: Some(gauge), connection: Some(connection), gateway: None };
        self.send_on(pod, held, body, send, quota.quotas, ctx).await
    }

    /// Counts the request in flight for the model and waits for one of the
    /// answering pod's connection slots.
    async fn take_slot(
        &self,
        pod: &Arc<PodInfo>,
        send: &Outbound<'_>,
        ctx: &mut RequestContext,
    ) -> Result<(InFlightMetric, ConnectionSlot), Failed> {
        ctx.access.pod = Some(Arc::clone(pod));
        let gauge = self.metrics.in_flight(send.model);
        let connection = self.connection_slot(pod).await.map_err(|err| Failed::Final(err.into_gateway_error(pod)))?;
        Ok((gauge, connection))
    }

    /// Sends the request to `pod`, holding `held` until its answer ends.
    async fn send_on(
        &self,
        pod: Arc<PodInfo>,
        held: Held,
        body: UpstreamBody,
        send: &Outbound<'_>,
        quotas: UserQuotas,
        ctx: &RequestContext,
    ) -> Result<Forwarded<U::Body>, Failed> {
        let mut phase = engine_phase(ctx, "upstream", &pod);
        let sending = std::time::Instant::now();
        let pool = Some(self.kernel.model_id(send.model));
        let request =
            upstream::build_request(send.parts, body, &pod, &ctx.access.request_id, pool, phase.propagation())
                .map_err(|reason| Failed::Final(GatewayError::UpstreamFailed { pod: pod.name.clone(), reason }))?;
        let response = match self.upstream.send(request).await {
            Ok(response) => response,
            Err(SendError::Connect(reason)) => {
                phase.fail("connect", reason.clone());
                return Err(Failed::Refused(Refusal::Pod { pod, reason }));
            }
            // The client stopped sending its upload: its failure, not the pod's.
            Err(_) if let Some(failure) = send.upload.and_then(Upload::client_failure) => {
                phase.fail("client", failure.to_string());
                return Err(Failed::Final(failure));
            }
            Err(err) => {
                let error = err.into_gateway_error(&pod);
                phase.fail(error.status().as_str().to_owned(), error.to_string());
                return Err(Failed::Final(error));
            }
        };
        let status = response.status();
        if phase.is_recording() {
            // A connection made for this request is the exchange's connect
            // phase; a pooled one had none.
            let opened = response.extensions().get::<UpstreamConn>().map(|UpstreamConn(conn)| conn.opened());
            match opened {
                Some(at) if at >= sending => phase.event("connected", at, Vec::new()),
                Some(_) => phase.set(KeyValue::new("turnstile.connection.reused", true)),
                None => {}
            }
            let head = KeyValue::new(attr::HTTP_STATUS, i64::from(status.as_u16()));
            phase.event("response headers", std::time::Instant::now(), vec![head.clone()]);
            phase.set(head);
            // A client span fails with any 4xx or 5xx (OpenTelemetry's HTTP conventions).
            if status.is_client_error() || status.is_server_error() {
                phase.fail(status.as_str().to_owned(), format!("the engine answered {status}"));
            }
        }
        // vLLM answers 404 for a model it does not serve before doing any work.
        if send.adapter
            && send.upload.is_none()
            && send.endpoint != Endpoint::Custom
            && status == http::StatusCode::NOT_FOUND
        {
            phase.fail("404", "the engine does not serve the adapter");
            return Err(Failed::Refused(Refusal::Unserved { pod }));
        }
        Ok(Forwarded {
            trace: phase,
            response,
            pod,
            headers: Vec::new(),
            on_usage: None,
            held,
            charge: None,
            quotas,
            hide_usage_chunk: false,
        })
    }

    /// Waits (within the upstream timeout) for one of `pod`'s connection slots.
    async fn connection_slot(&self, pod: &PodInfo) -> Result<ConnectionSlot, SendError> {
        let slots = pod.load.connection_slots(self.settings.max_connections_per_pod.max(1));
        match tokio::time::timeout(self.settings.upstream_timeout, slots.acquire_owned()).await {
            Ok(Ok(slot)) => Ok(slot),
            Ok(Err(_closed)) => Err(SendError::Other("connection slots closed".to_owned())),
            Err(_) => Err(SendError::Timeout(self.settings.upstream_timeout)),
        }
    }

    /// The error for a request whose every try was refused.
    fn give_up(&self, last: Option<Refusal>, send: &Outbound<'_>, ctx: &RequestContext) -> GatewayError {
        match last {
            Some(Refusal::Pod { pod, reason }) => SendError::Connect(reason).into_gateway_error(&pod),
            Some(Refusal::Prefill { plan, failure }) => self.prefill_failed(&plan, send, failure, ctx),
            Some(Refusal::Unserved { .. }) => GatewayError::UnknownModel { model: send.model.to_string() },
            None => GatewayError::NoReadyPods { model: send.model.to_string() },
        }
    }
}

/// Most pods one adapter request is sent on to after a 404 for the adapter.
const MAX_UNSERVED: usize = 8;

/// The candidates no refusal has ruled out.
fn remaining<'a>(candidates: &'a [Arc<PodInfo>], refused: &[Refusal]) -> Cow<'a, [Arc<PodInfo>]> {
    if refused.is_empty() {
        return Cow::Borrowed(candidates);
    }
    Cow::Owned(candidates.iter().filter(|p| !refused.iter().any(|r| r.pod_key() == p.key)).cloned().collect())
}

fn unroutable_error(unroutable: Unroutable, model: &str) -> GatewayError {
    match unroutable {
        Unroutable::NoCandidates => GatewayError::NoReadyPods { model: model.to_owned() },
        Unroutable::Pd(PdRefusal::NotReady { prefill, decode }) => {
            GatewayError::NoPdRoleset { model: model.to_owned(), prefill, decode }
        }
        Unroutable::Pd(refusal) => GatewayError::RoutingFailed { model: model.to_owned(), reason: refusal.to_string() },
        Unroutable::Slo(refusal) => {
            GatewayError::RoutingFailed { model: model.to_owned(), reason: refusal.to_string() }
        }
        Unroutable::Queued(_) => {
            GatewayError::RoutingFailed { model: model.to_owned(), reason: "load capacity reached".into() }
        }
    }
}

/// A span for an exchange with an engine (the answer, or a `pd` prefill):
/// the engine sees it as its parent.
pub(super) fn engine_phase(ctx: &RequestContext, name: &'static str, pod: &PodInfo) -> Phase {
    let mut phase = ctx.phase(name, SpanKind::Client);
    if phase.is_recording() {
        phase.set(KeyValue::new(attr::POD, pod.name.to_string()));
        if let Some((host, port)) = pod.addr_text.rsplit_once(':') {
            phase.set(KeyValue::new(attr::SERVER_ADDRESS, host.trim_matches(['[', ']']).to_owned()));
            if let Ok(port) = port.parse::<i64>() {
                phase.set(KeyValue::new(attr::SERVER_PORT, port));
            }
        }
    }
    phase
}

/// What the strategy chose, on the route span.
fn trace_route(phase: &mut Phase, routed: &Result<Route, Unroutable>, strategy: &'static str) {
    phase.set(KeyValue::new(attr::STRATEGY, strategy));
    match routed {
        Ok(Route::Single { pod, .. }) => phase.set(KeyValue::new(attr::POD, pod.name.to_string())),
        Ok(Route::Disaggregated(plan)) => {
            phase.set(KeyValue::new(attr::POD, plan.decode.name.to_string()));
            phase.set(KeyValue::new("turnstile.prefill_pod", plan.prefill.name.to_string()));
        }
        Err(Unroutable::Queued(_)) => phase.set(KeyValue::new("turnstile.queued", true)),
        Err(_) => phase.fail("unroutable", "no pod could be chosen"),
    }
}

fn log_refusal(refusal: &Refusal, ctx: &RequestContext) {
    let request_id = ctx.access.request_id.to_str().unwrap_or("");
    match refusal {
        Refusal::Pod { pod, reason } => {
            tracing::warn!(request_id, pod = %pod.key, reason, "connect to pod failed; trying another pod");
        }
        Refusal::Unserved { pod } => {
            tracing::warn!(request_id, pod = %pod.key, "the engine does not serve the adapter (404); trying another pod");
        }
        Refusal::Prefill { plan, failure } => tracing::warn!(
            request_id,
            pod = %plan.prefill.key,
            reason = %failure.detail,
            "connect to prefill pod failed; choosing another pair"
        ),
    }
}
