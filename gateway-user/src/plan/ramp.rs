//! The load side of `turnstile plan`: open-loop stages of OpenAI requests
//! through the gateway, and the bounded ramp that steps through them.
//!
//! Open loop: request `i` of a stage is due at `start + i / qps` and is sent
//! then whatever earlier answers do, so an overloaded replica shows up as
//! growing latency (measured from the due time) instead of as a client that
//! politely slows down.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;

use super::knee::{Criteria, StageStats, Verdict};

/// HTTP client of the planner.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector)
}

/// What every request of a ramp looks like.
#[derive(Clone, Debug)]
pub struct Workload {
    /// `…/v1/chat/completions` on the gateway.
    pub url: Uri,
    pub model: String,
    /// Words in each prompt (about one token each).
    pub input_tokens: u32,
    /// `max_tokens` of each request.
    pub output_tokens: u32,
    pub stream: bool,
    /// Send the prefill half of a disaggregated request, as the gateway's
    /// `pd` path does: `kv_transfer_params.do_remote_decode`, one token, no stream.
    pub remote_decode_prefill: bool,
    /// Extra headers: routing strategy, external filter, authorization.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub request_timeout: Duration,
}

impl Workload {
    /// The body of request `i`: a distinct first word, so no two prompts
    /// share a cached prefix and every request pays its full prefill.
    pub(super) fn body(&self, i: u64) -> Bytes {
        const WORDS: [&str; 8] = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"];
        let mut prompt = format!("q{i}");
        for n in 1..self.input_tokens {
            prompt.push(' ');
            prompt.push_str(WORDS[(n as usize + i as usize) % WORDS.len()]);
        }
        let mut body = serde_json::json!({
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.output_tokens,
            "stream": self.stream,
        });
        if self.remote_decode_prefill {
            body["max_completion_tokens"] = serde_json::json!(1);
            body["stream"] = serde_json::json!(false);
            body["kv_transfer_params"] = serde_json::json!({
                "do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
                "remote_block_ids": null, "remote_host": null, "remote_port": null,
            });
        } else if self.stream {
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        Bytes::from(body.to_string())
    }

    fn request(&self, i: u64) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut builder = Request::post(self.url.clone()).header(CONTENT_TYPE, "application/json");
        for (name, value) in &self.headers {
            builder = builder.header(name, value);
        }
        Ok(builder.body(Full::new(self.body(i)))?)
    }
}

/// The authorization header for an API key.
pub fn bearer(key: &str) -> anyhow::Result<(HeaderName, HeaderValue)> {
    let mut value = HeaderValue::from_str(&format!("Bearer {key}")).context("API key is not a valid header value")?;
    value.set_sensitive(true);
    Ok((AUTHORIZATION, value))
}

/// How one request ended: its latency from its due time, or a failure.
type Outcome = Result<(Instant, Duration), ()>;

/// Sends one request and waits for the whole answer (the stream included).
async fn one_request(client: HttpClient, request: Request<Full<Bytes>>, due: Instant, timeout: Duration) -> Outcome {
    let work = async {
        let response = client.request(request).await.map_err(|_| ())?;
        let ok = response.status().is_success();
        // Read to the end: a streamed answer is done only at its last event.
        response.into_body().collect().await.map_err(|_| ())?;
        if ok { Ok(()) } else { Err(()) }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(())) => {
            let done = Instant::now();
            Ok((done, done.saturating_duration_since(due)))
        }
        _ => Err(()),
    }
}

/// Runs one open-loop stage of `count` requests at `qps`, then waits for
/// its answers until `drain_deadline`; unanswered requests count as errors.
pub async fn run_stage(
    client: &HttpClient,
    workload: &Workload,
    qps: f64,
    count: u64,
    first_id: u64,
    drain_deadline: Instant,
) -> anyhow::Result<StageStats> {
    if !(qps.is_finite() && qps > 0.0) {
        bail!("stage rate must be positive, not {qps}");
    }
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..count {
        let due = start + Duration::from_secs_f64(i as f64 / qps);
        tokio::time::sleep_until(due.into()).await;
        let request = workload.request(first_id + i)?;
        tasks.spawn(one_request(client.clone(), request, due, workload.request_timeout));
    }
    let mut latencies = Vec::with_capacity(count as usize);
    let (mut first_done, mut last_done): (Option<Instant>, Option<Instant>) = (None, None);
    let mut errors = 0u64;
    loop {
        let next = tokio::time::timeout_at(drain_deadline.into(), tasks.join_next()).await;
        match next {
            Ok(Some(Ok(Ok((done, latency))))) => {
                latencies.push(latency);
                first_done = Some(first_done.map_or(done, |f| f.min(done)));
                last_done = Some(last_done.map_or(done, |l| l.max(done)));
            }
            Ok(Some(_)) => errors += 1,
            Ok(None) => break,
            Err(_) => {
                // Out of time: what is still running failed to answer.
                errors += tasks.len() as u64;
                tasks.abort_all();
                break;
            }
        }
    }
    latencies.sort_unstable();
    let ok = latencies.len() as u64;
    // Completions per second between the first and the last answer: under
    // capacity they arrive as fast as they were sent, past it as fast as the
    // replicas finish them.
    let achieved_qps = match (first_done, last_done) {
        (Some(first), Some(last)) if ok >= 2 && last > first => (ok - 1) as f64 / (last - first).as_secs_f64(),
        _ if ok >= 1 => qps.min(ok as f64),
        _ => 0.0,
    };
    Ok(StageStats {
        offered_qps: qps,
        achieved_qps,
        sent: count,
        errors,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
    })
}

/// The `q` quantile of sorted values (nearest rank).
pub fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// How far and how fast the ramp may go.
#[derive(Clone, Copy, Debug)]
pub struct RampBounds {
    pub start_qps: f64,
    /// Each coarse stage offers this many times the previous one.
    pub step_factor: f64,
    pub stage: Duration,
    /// Bisection stages between the last sustained stage and the knee.
    pub refine_stages: u32,
    /// Whole ramp, stages and the waits for their answers.
    pub max_time: Duration,
    /// Whole ramp, requests sent.
    pub max_requests: u64,
}

/// One ramp's stages, in the order they ran, with their verdicts.
#[derive(Clone, Debug, Default)]
pub struct Ramp {
    pub stages: Vec<(StageStats, Verdict)>,
    /// Why the ramp stopped before finding a knee, if it did.
    pub cut_short: Option<String>,
}

/// Steps the offered load up until a stage degrades (the knee), then
/// bisects between the last sustained stage and the knee. Every stage is
/// cut to what is left of the time and request budgets; `progress` sees
/// each stage as it ends.
pub async fn ramp(
    client: &HttpClient,
    workload: &Workload,
    bounds: RampBounds,
    criteria: &Criteria,
    progress: &mut dyn FnMut(&StageStats, &Verdict),
) -> anyhow::Result<Ramp> {
    let deadline = Instant::now() + bounds.max_time;
    let mut sent = 0u64;
    let mut ramp = Ramp::default();
    let mut baseline: Option<Duration> = None;
    // The highest sustained and the lowest degraded offered load so far.
    let mut last_good = 0.0f64;
    let mut knee: Option<f64> = None;
    let mut next_coarse = bounds.start_qps;
    let mut refinements = 0;
    loop {
        let qps = match knee {
            None => next_coarse,
            Some(_) if refinements >= bounds.refine_stages => break,
            Some(high) => (last_good + high) / 2.0,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        // A stage needs its send window plus time for its answers.
        if left < bounds.stage.mul_f64(1.5) {
            ramp.cut_short = knee.is_none().then(|| format!("time budget of {:?} used up", bounds.max_time));
            break;
        }
        let count = ((qps * bounds.stage.as_secs_f64()).round() as u64).max(2);
        if sent + count > bounds.max_requests {
            ramp.cut_short = knee.is_none().then(|| format!("request budget of {} used up", bounds.max_requests));
            break;
        }
        let drain_deadline = (Instant::now() + bounds.stage + workload.request_timeout).min(deadline);
        let stats = run_stage(client, workload, qps, count, sent, drain_deadline).await?;
        sent += count;
        let verdict = criteria.judge(&stats, baseline);
        progress(&stats, &verdict);
        let sustained = verdict == Verdict::Sustained;
        ramp.stages.push((stats, verdict));
        if baseline.is_none() && !sustained {
            bail!(
                "the lowest stage ({qps:.1} qps) already fails ({}); start lower with --start-qps or check the model's pods",
                ramp.stages.last().map(|(_, v)| v.to_string()).unwrap_or_default()
            );
        }
        // The lowest p99 at a sustained load: the first stage's may carry
        // connection setup.
        if sustained && let Some(p99) = ramp.stages.last().and_then(|(s, _)| s.p99) {
            baseline = Some(baseline.map_or(p99, |b| b.min(p99)));
        }
        if knee.is_some() {
            refinements += 1;
        }
        match (sustained, knee) {
            (true, None) => {
                last_good = qps;
                next_coarse = qps * bounds.step_factor;
            }
            (true, Some(_)) => last_good = qps,
            (false, _) => knee = Some(qps),
        }
    }
    Ok(ramp)
}
