//! The flags of `turnstile plan`; their defaults are [`PlanConfig`]'s.

use std::path::PathBuf;

use clap::Args;

use crate::plan::PlanConfig;

/// Settings of `turnstile plan`.
#[derive(Args, Debug, Clone)]
pub struct PlanArgs {
    /// Gateway proxy URL the load is sent to.
    #[arg(long, default_value_t = PlanConfig::default().gateway)]
    pub gateway: String,

    /// Gateway admin URL, where the Ready pods under test are counted
    /// (`/debug/endpoints`).
    #[arg(long, default_value_t = PlanConfig::default().admin)]
    pub admin: String,

    /// Model to measure.
    #[arg(long)]
    pub model: String,

    /// Peak QPS the deployment has to serve.
    #[arg(long)]
    pub target_qps: f64,

    /// Replicas the load is spread over. [default: the model's Ready pods on
    /// the admin API; with --pd, its Ready pods of each role]
    #[arg(long)]
    pub replicas_under_test: Option<u32>,

    /// Share of the measured peak to plan each replica for.
    #[arg(long, default_value_t = PlanConfig::default().safety_margin)]
    pub safety_margin: f64,

    /// Accept a --safety-margin outside the recommended 0.6–0.7.
    #[arg(long)]
    pub allow_any_margin: bool,

    /// QPS of the first stage.
    #[arg(long, default_value_t = PlanConfig::default().start_qps)]
    pub start_qps: f64,

    /// Each stage offers this many times the QPS of the one before, until the knee.
    #[arg(long, default_value_t = PlanConfig::default().step_factor)]
    pub step_factor: f64,

    /// Length of each stage, in seconds.
    #[arg(long, default_value_t = PlanConfig::default().stage_seconds)]
    pub stage_seconds: f64,

    /// Stages that bisect between the last sustained stage and the knee.
    #[arg(long, default_value_t = PlanConfig::default().refine_stages)]
    pub refine_stages: u32,

    /// Longest the whole measurement may take (every ramp together), in seconds.
    #[arg(long, default_value_t = PlanConfig::default().max_seconds)]
    pub max_seconds: u64,

    /// Most requests the whole measurement may send.
    #[arg(long, default_value_t = PlanConfig::default().max_requests)]
    pub max_requests: u64,

    /// A stage is past the knee when its p99 latency exceeds this many times
    /// the lowest p99 of the stages sustained before it ...
    #[arg(long, default_value_t = PlanConfig::default().latency_factor)]
    pub latency_factor: f64,

    /// ... and exceeds it by more than this many milliseconds (ignores a fast
    /// engine's jitter).
    #[arg(long, default_value_t = PlanConfig::default().latency_slack_ms)]
    pub latency_slack_ms: u64,

    /// ... or when more than this share of its requests fail ...
    #[arg(long, default_value_t = PlanConfig::default().max_error_rate)]
    pub max_error_rate: f64,

    /// ... or when it achieves less than this share of the QPS it offered.
    #[arg(long, default_value_t = PlanConfig::default().min_achieved_ratio)]
    pub min_achieved_ratio: f64,

    /// Time one request may take before it counts as failed, in seconds.
    #[arg(long, default_value_t = PlanConfig::default().request_timeout_seconds)]
    pub request_timeout_seconds: u64,

    /// Average prompt length of the workload, in tokens (sent as words).
    #[arg(long, default_value_t = PlanConfig::default().input_tokens)]
    pub input_tokens: u32,

    /// Average answer length of the workload, in tokens (`max_tokens`).
    #[arg(long, default_value_t = PlanConfig::default().output_tokens)]
    pub output_tokens: u32,

    /// Send `stream: true` requests (latency is then the whole stream).
    #[arg(long)]
    pub stream: bool,

    /// Size prefill and decode pods separately (see `turnstile plan --help`).
    #[arg(long)]
    pub pd: bool,

    /// `routing-strategy` header of every request. [default: none, the
    /// model's own; with --pd, pd for the decode ramp (the prefill ramp
    /// always uses least-request)]
    #[arg(long)]
    pub routing_strategy: Option<String>,

    /// Where the curve is drawn; with --pd, `-prefill` and `-decode` are
    /// added to the file name.
    #[arg(long, default_value_os_t = PlanConfig::default().svg)]
    pub svg: PathBuf,

    /// Also print the result as one JSON line (for scripts).
    #[arg(long)]
    pub json: bool,

    /// API key sent as `Authorization: Bearer`, when the gateway requires one.
    #[arg(long, env = "AIBRIX_AUTH_BEARER_TOKEN", hide_env_values = true)]
    pub api_key: Option<String>,
}

impl From<PlanArgs> for PlanConfig {
    fn from(args: PlanArgs) -> Self {
        same_fields!(args => PlanConfig {
            gateway,
            admin,
            model,
            target_qps,
            replicas_under_test,
            safety_margin,
            allow_any_margin,
            start_qps,
            step_factor,
            stage_seconds,
            refine_stages,
            max_seconds,
            max_requests,
            latency_factor,
            latency_slack_ms,
            max_error_rate,
            min_achieved_ratio,
            request_timeout_seconds,
            input_tokens,
            output_tokens,
            stream,
            pd,
            routing_strategy,
            svg,
            json,
            api_key,
        })
    }
}
