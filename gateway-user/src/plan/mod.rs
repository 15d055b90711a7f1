//! `turnstile plan`: how many replicas a model needs, measured.
//!
//! The production guide's recipe, automated: ramp real OpenAI requests
//! through the gateway at increasing QPS until latency, errors or
//! throughput degrade (the knee), note the peak the replicas under test
//! sustained, divide by how many there were, apply a safety margin (60–70%
//! of the peak) and print `replicas = ceil(target_QPS / sustainable_QPS_per_replica)`
//! with the measured curve as a table and an SVG plot.
//!
//! PD (`--pd`) sizes the two pools separately. Every disaggregated request
//! costs one prefill on a prefill pod (compute-bound: grows with the input
//! tokens) and one decode on a decode pod (memory-bandwidth-bound: grows
//! with the output tokens), so each pool must sustain the target QPS at the
//! workload's token mix. The planner measures them one after the other:
//! - prefill: the prefill half the gateway's `pd` path sends (prompts of
//!   `--input-tokens`, one token, `kv_transfer_params.do_remote_decode`),
//!   kept on the prefill pods by `external-filter: role-name=prefill` and
//!   off the `pd` path by `routing-strategy: least-request`;
//! - decode: whole requests through the `pd` path with a short prompt
//!   (8 tokens) and `--output-tokens`, so their prefills are cheap and the
//!   decode pods are what runs out.

pub mod knee;
pub mod ramp;
pub mod svg;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use http::Uri;
use http::header::{HeaderName, HeaderValue};
use http_body_util::BodyExt;

use knee::{Criteria, Sizing, StageStats, Verdict};
use ramp::{HttpClient, RampBounds, Workload};

/// The safety margins the production guide recommends (target 60–70% of the
/// measured peak).
const RECOMMENDED_MARGIN: std::ops::RangeInclusive<f64> = 0.6..=0.7;

/// Settings of `turnstile plan` (flags in `cli`).
#[derive(Debug, Clone, PartialEq)]
pub struct PlanConfig {
    /// Gateway proxy URL the load is sent to.
    pub gateway: String,
    /// Gateway admin URL, where the Ready pods under test are counted
    /// (`/debug/endpoints`).
    pub admin: String,
    /// Model to measure.
    pub model: String,
    /// Peak QPS the deployment has to serve.
    pub target_qps: f64,
    /// Replicas the load is spread over. [default: the model's Ready pods on
    /// the admin API; with --pd, its Ready pods of each role]
    pub replicas_under_test: Option<u32>,
    /// Share of the measured peak to plan each replica for.
    pub safety_margin: f64,
    /// Accept a --safety-margin outside the recommended 0.6–0.7.
    pub allow_any_margin: bool,
    /// QPS of the first stage.
    pub start_qps: f64,
    /// Each stage offers this many times the QPS of the one before, until the knee.
    pub step_factor: f64,
    /// Length of each stage, in seconds.
    pub stage_seconds: f64,
    /// Stages that bisect between the last sustained stage and the knee.
    pub refine_stages: u32,
    /// Longest the whole measurement may take (every ramp together), in seconds.
    pub max_seconds: u64,
    /// Most requests the whole measurement may send.
    pub max_requests: u64,
    /// A stage is past the knee when its p99 latency exceeds this many times
    /// the lowest p99 of the stages sustained before it ...
    pub latency_factor: f64,
    /// ... and exceeds it by more than this many milliseconds (ignores a fast
    /// engine's jitter).
    pub latency_slack_ms: u64,
    /// ... or when more than this share of its requests fail ...
    pub max_error_rate: f64,
    /// ... or when it achieves less than this share of the QPS it offered.
    pub min_achieved_ratio: f64,
    /// Time one request may take before it counts as failed, in seconds.
    pub request_timeout_seconds: u64,
    /// Average prompt length of the workload, in tokens (sent as words).
    pub input_tokens: u32,
    /// Average answer length of the workload, in tokens (`max_tokens`).
    pub output_tokens: u32,
    /// Send `stream: true` requests (latency is then the whole stream).
    pub stream: bool,
    /// Size prefill and decode pods separately (see `turnstile plan --help`).
    pub pd: bool,
    /// `routing-strategy` header of every request. [default: none, the
    /// model's own; with --pd, pd for the decode ramp (the prefill ramp
    /// always uses least-request)]
    pub routing_strategy: Option<String>,
    /// Where the curve is drawn; with --pd, `-prefill` and `-decode` are
    /// added to the file name.
    pub svg: PathBuf,
    /// Also print the result as one JSON line (for scripts).
    pub json: bool,
    /// API key sent as `Authorization: Bearer`, when the gateway requires one.
    pub api_key: Option<String>,
}

impl Default for PlanConfig {
    /// The flags' defaults; `model` and `target_qps` have none (the flags are required).
    fn default() -> Self {
        Self {
            gateway: "http://127.0.0.1:8888".to_owned(),
            admin: "http://127.0.0.1:8080".to_owned(),
            model: String::new(),
            target_qps: 0.0,
            replicas_under_test: None,
            safety_margin: 0.65,
            allow_any_margin: false,
            start_qps: 1.0,
            step_factor: 1.5,
            stage_seconds: 3.0,
            refine_stages: 3,
            max_seconds: 60,
            max_requests: 20_000,
            latency_factor: 2.0,
            latency_slack_ms: 10,
            max_error_rate: 0.01,
            min_achieved_ratio: 0.9,
            request_timeout_seconds: 30,
            input_tokens: 64,
            output_tokens: 64,
            stream: false,
            pd: false,
            routing_strategy: None,
            svg: PathBuf::from("turnstile-plan.svg"),
            json: false,
            api_key: None,
        }
    }
}

/// Pods of one role (or all of the model's) a ramp runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pool {
    All,
    Prefill,
    Decode,
}

impl Pool {
    fn name(self) -> &'static str {
        match self {
            Self::All => "replicas",
            Self::Prefill => "prefill",
            Self::Decode => "decode",
        }
    }
}

/// One pool's measurement and sizing.
struct PoolPlan {
    pool: Pool,
    replicas_under_test: u32,
    stages: Vec<(StageStats, Verdict)>,
    peak_qps: f64,
    knee_found: bool,
    cut_short: Option<String>,
    sizing: Sizing,
    svg: PathBuf,
}

impl PlanConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if !(self.target_qps.is_finite() && self.target_qps > 0.0) {
            bail!("--target-qps must be positive");
        }
        if !(self.safety_margin > 0.0 && self.safety_margin <= 1.0) {
            bail!("--safety-margin must be in (0, 1]");
        }
        if !self.allow_any_margin && !RECOMMENDED_MARGIN.contains(&self.safety_margin) {
            bail!(
                "--safety-margin {} is outside the recommended 0.6–0.7 (plan for 60–70% of the peak); \
                 pass --allow-any-margin to use it anyway",
                self.safety_margin
            );
        }
        if !(self.start_qps.is_finite() && self.start_qps > 0.0) {
            bail!("--start-qps must be positive");
        }
        if !(self.step_factor.is_finite() && self.step_factor > 1.0) {
            bail!("--step-factor must be above 1");
        }
        if !(self.stage_seconds.is_finite() && (0.2..=600.0).contains(&self.stage_seconds)) {
            bail!("--stage-seconds must be within 0.2–600");
        }
        if self.max_seconds == 0 || self.max_requests == 0 {
            bail!("--max-seconds and --max-requests must be positive");
        }
        if self.input_tokens == 0 || self.output_tokens == 0 {
            bail!("--input-tokens and --output-tokens must be positive");
        }
        Ok(())
    }

    fn criteria(&self) -> Criteria {
        Criteria {
            latency_factor: self.latency_factor,
            latency_slack: Duration::from_millis(self.latency_slack_ms),
            max_error_rate: self.max_error_rate,
            min_achieved_ratio: self.min_achieved_ratio,
        }
    }
}

/// Runs `turnstile plan`: prints the curve and the sizing on stdout.
pub fn run(args: &PlanConfig) -> anyhow::Result<()> {
    args.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(plan(args))
}

async fn plan(args: &PlanConfig) -> anyhow::Result<()> {
    let client = ramp::client();
    let base = args.gateway.trim_end_matches('/');
    let url: Uri = format!("{base}/v1/chat/completions").parse().context("--gateway is not a URL")?;
    let pools: &[Pool] = if args.pd { &[Pool::Prefill, Pool::Decode] } else { &[Pool::All] };
    let mut stdout = std::io::stdout();
    let _ = writeln!(
        stdout,
        "turnstile plan: model {}, target {} qps, safety margin {}, {} in / {} out tokens{}",
        args.model,
        args.target_qps,
        args.safety_margin,
        args.input_tokens,
        args.output_tokens,
        if args.pd { ", prefill and decode sized separately" } else { "" }
    );
    let mut plans = Vec::new();
    let started = std::time::Instant::now();
    let mut requests_sent = 0u64;
    for (i, &pool) in pools.iter().enumerate() {
        let replicas = match args.replicas_under_test {
            Some(n) => n,
            None => ready_pods(&client, &args.admin, &args.model, pool).await?,
        };
        if replicas == 0 {
            bail!("model {} has no Ready {} pods on {}; nothing to measure", args.model, pool.name(), args.admin);
        }
        // The time and request budgets are shared by the ramps.
        let share = (pools.len() - i) as u32;
        let time_left = Duration::from_secs(args.max_seconds).saturating_sub(started.elapsed());
        let requests_left = args.max_requests.saturating_sub(requests_sent);
        let bounds = RampBounds {
            start_qps: args.start_qps,
            step_factor: args.step_factor,
            stage: Duration::from_secs_f64(args.stage_seconds),
            refine_stages: args.refine_stages,
            max_time: time_left / share,
            max_requests: requests_left / u64::from(share),
        };
        let workload = workload(args, url.clone(), pool)?;
        let _ = writeln!(
            stdout,
            "\n{} ramp over {replicas} Ready {} ({} in / {} out tokens)",
            pool.name(),
            if replicas == 1 { "pod" } else { "pods" },
            workload.input_tokens,
            workload.output_tokens
        );
        let _ = writeln!(
            stdout,
            "{:>6} {:>12} {:>13} {:>6} {:>7} {:>9} {:>9}  verdict",
            "stage", "offered qps", "achieved qps", "sent", "errors", "p50 ms", "p99 ms"
        );
        let mut n = 0;
        let mut print = |stats: &StageStats, verdict: &Verdict| {
            n += 1;
            let mut out = std::io::stdout();
            let _ = writeln!(out, "{}", stage_row(n, stats, verdict));
            let _ = out.flush();
        };
        let measured = ramp::ramp(&client, &workload, bounds, &args.criteria(), &mut print).await?;
        requests_sent += measured.stages.iter().map(|(s, _)| s.sent).sum::<u64>();
        let Some(capacity) = knee::capacity(&measured.stages) else {
            bail!("no stage of the {} ramp was sustained", pool.name());
        };
        let sizing = knee::size(capacity.peak_qps, replicas, args.safety_margin, args.target_qps);
        let svg = svg_path(&args.svg, pool);
        let title = format!("turnstile plan: {} ({}, {replicas} under test)", args.model, pool.name());
        let marks = svg::Marks {
            peak_qps: capacity.peak_qps,
            sustainable_qps: sizing.sustainable_per_replica * f64::from(replicas),
        };
        std::fs::write(&svg, svg::render(&title, &measured.stages, &marks))
            .with_context(|| format!("writing {}", svg.display()))?;
        plans.push(PoolPlan {
            pool,
            replicas_under_test: replicas,
            stages: measured.stages,
            peak_qps: capacity.peak_qps,
            knee_found: capacity.knee_found,
            cut_short: measured.cut_short,
            sizing,
            svg,
        });
    }
    for plan in &plans {
        let _ = writeln!(stdout, "\n{}", summary(plan, args));
    }
    if args.json {
        let _ = writeln!(stdout, "{}", json_summary(&plans, args));
    }
    Ok(())
}

fn workload(args: &PlanConfig, url: Uri, pool: Pool) -> anyhow::Result<Workload> {
    let mut headers: Vec<(HeaderName, HeaderValue)> = Vec::new();
    let strategy = match (pool, &args.routing_strategy) {
        (Pool::Prefill, _) => Some("least-request"),
        (_, Some(name)) => Some(name.as_str()),
        (Pool::All, None) => None,
        (Pool::Decode, None) => Some("pd"),
    };
    if let Some(name) = strategy {
        headers.push((HeaderName::from_static("routing-strategy"), HeaderValue::from_str(name)?));
    }
    if pool == Pool::Prefill {
        headers.push((HeaderName::from_static("external-filter"), HeaderValue::from_static("role-name=prefill")));
    }
    if let Some(key) = &args.api_key {
        headers.push(ramp::bearer(key)?);
    }
    let (input_tokens, output_tokens) = match pool {
        Pool::All => (args.input_tokens, args.output_tokens),
        Pool::Prefill => (args.input_tokens, 1),
        Pool::Decode => (args.input_tokens.min(8), args.output_tokens),
    };
    Ok(Workload {
        url,
        model: args.model.clone(),
        input_tokens,
        output_tokens,
        stream: args.stream,
        remote_decode_prefill: pool == Pool::Prefill,
        headers,
        request_timeout: Duration::from_secs(args.request_timeout_seconds.max(1)),
    })
}

/// Ready pods of `model` in `pool`, from the admin API's `/debug/endpoints`.
async fn ready_pods(client: &HttpClient, admin: &str, model: &str, pool: Pool) -> anyhow::Result<u32> {
    let url: Uri =
        format!("{}/debug/endpoints", admin.trim_end_matches('/')).parse().context("--admin is not a URL")?;
    let request = http::Request::get(url.clone()).body(http_body_util::Full::new(bytes::Bytes::new()))?;
    let response = tokio::time::timeout(Duration::from_secs(5), client.request(request))
        .await
        .with_context(|| format!("{url} did not answer in 5 s"))?
        .with_context(|| format!("GET {url} (or pass --replicas-under-test)"))?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("GET {url}: {status}");
    }
    let endpoints: serde_json::Value = serde_json::from_slice(&body).with_context(|| format!("{url}: not JSON"))?;
    let Some(pods) = endpoints.get(model).and_then(|m| m.get("pods")).and_then(|p| p.as_array()) else {
        bail!("the gateway at {admin} knows no model {model}");
    };
    let count = pods
        .iter()
        .filter(|pod| pod.get("ready").and_then(serde_json::Value::as_bool) == Some(true))
        .filter(|pod| match pool {
            Pool::All => true,
            Pool::Prefill | Pool::Decode => pod.get("role").and_then(|r| r.as_str()) == Some(pool.name()),
        })
        .count();
    Ok(u32::try_from(count).unwrap_or(u32::MAX))
}

fn svg_path(base: &Path, pool: Pool) -> PathBuf {
    if pool == Pool::All {
        return base.to_owned();
    }
    let stem = base.file_stem().and_then(|s| s.to_str()).unwrap_or("turnstile-plan");
    base.with_file_name(format!("{stem}-{}.svg", pool.name()))
}

fn stage_row(n: usize, stats: &StageStats, verdict: &Verdict) -> String {
    let ms = |d: Option<Duration>| d.map_or_else(|| "-".to_owned(), |d| format!("{:.1}", d.as_secs_f64() * 1e3));
    format!(
        "{n:>6} {:>12.1} {:>13.1} {:>6} {:>7} {:>9} {:>9}  {verdict}",
        stats.offered_qps,
        stats.achieved_qps,
        stats.sent,
        stats.errors,
        ms(stats.p50),
        ms(stats.p99)
    )
}

fn summary(plan: &PoolPlan, args: &PlanConfig) -> String {
    let PoolPlan { pool, replicas_under_test, stages: _, peak_qps, knee_found, cut_short, sizing, svg } = plan;
    let mut out = String::new();
    let label = match pool {
        Pool::All => "replicas".to_owned(),
        Pool::Prefill | Pool::Decode => format!("{} replicas", pool.name()),
    };
    let bound = if *knee_found { "" } else { "at least " };
    out.push_str(&format!(
        "measured peak: {bound}{peak_qps:.1} qps over {replicas_under_test} = {bound}{:.1} qps per replica\n",
        sizing.peak_per_replica
    ));
    if let Some(reason) = cut_short {
        out.push_str(&format!(
            "note: no knee found ({reason}); the peak is a lower bound and the count below an upper bound\n"
        ));
    }
    out.push_str(&format!(
        "safety margin {}: sustainable {:.1} qps per replica\n{label} = ceil({} / {:.1}) = {}\ncurve: {}",
        args.safety_margin,
        sizing.sustainable_per_replica,
        args.target_qps,
        sizing.sustainable_per_replica,
        sizing.replicas,
        svg.display()
    ));
    out
}

fn json_summary(plans: &[PoolPlan], args: &PlanConfig) -> serde_json::Value {
    let pools: Vec<serde_json::Value> = plans
        .iter()
        .map(|p| {
            serde_json::json!({
                "pool": p.pool.name(),
                "replicas_under_test": p.replicas_under_test,
                "peak_qps": p.peak_qps,
                "knee_found": p.knee_found,
                "peak_qps_per_replica": p.sizing.peak_per_replica,
                "sustainable_qps_per_replica": p.sizing.sustainable_per_replica,
                "replicas": p.sizing.replicas,
                "stages": p.stages.len(),
                "svg": p.svg.display().to_string(),
            })
        })
        .collect();
    serde_json::json!({
        "model": args.model,
        "target_qps": args.target_qps,
        "safety_margin": args.safety_margin,
        "pools": pools,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--model m --target-qps 100`, the rest as the flags' defaults.
    fn config() -> PlanConfig {
        PlanConfig { model: "m".to_owned(), target_qps: 100.0, ..PlanConfig::default() }
    }

    #[test]
    fn the_margin_stays_within_the_recommended_range_unless_overridden() {
        assert!(config().validate().is_ok(), "0.65 by default");
        assert!(PlanConfig { safety_margin: 0.8, ..config() }.validate().is_err());
        assert!(PlanConfig { safety_margin: 0.8, allow_any_margin: true, ..config() }.validate().is_ok());
        assert!(PlanConfig { safety_margin: 1.5, allow_any_margin: true, ..config() }.validate().is_err());
        assert!(PlanConfig { step_factor: 1.0, ..config() }.validate().is_err());
    }

    #[test]
    fn pd_ramps_stay_on_their_pool_and_off_the_pd_path() -> anyhow::Result<()> {
        let args =
            PlanConfig { pd: true, input_tokens: 512, output_tokens: 128, api_key: Some("k".to_owned()), ..config() };
        let url: Uri = "http://gw/v1/chat/completions".parse()?;
        let prefill = workload(&args, url.clone(), Pool::Prefill)?;
        assert_eq!((prefill.input_tokens, prefill.output_tokens), (512, 1));
        let header = |w: &Workload, name: &str| {
            w.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.to_str().unwrap_or("").to_owned())
        };
        assert_eq!(header(&prefill, "external-filter").as_deref(), Some("role-name=prefill"));
        assert_eq!(header(&prefill, "routing-strategy").as_deref(), Some("least-request"));
        assert_eq!(header(&prefill, "authorization").as_deref(), Some("Bearer k"));
        assert!(prefill.remote_decode_prefill);
        let body: serde_json::Value = serde_json::from_slice(&prefill.body(3))?;
        assert_eq!(body["kv_transfer_params"]["do_remote_decode"], true);
        assert_eq!((body["max_tokens"].as_u64(), body["stream"].as_bool()), (Some(1), Some(false)));
        assert_eq!(body["messages"][0]["content"].as_str().map(|c| c.split_whitespace().count()), Some(512));
        let decode = workload(&args, url.clone(), Pool::Decode)?;
        assert_eq!((decode.input_tokens, decode.output_tokens), (8, 128));
        assert_eq!(header(&decode, "routing-strategy").as_deref(), Some("pd"), "whole requests through pd");
        assert_eq!(header(&decode, "external-filter"), None);
        let all = workload(&config(), url, Pool::All)?;
        assert_eq!(header(&all, "routing-strategy"), None, "the model's own strategy");
        assert_eq!(svg_path(Path::new("out/p.svg"), Pool::Decode), Path::new("out/p-decode.svg"));
        Ok(())
    }
}
