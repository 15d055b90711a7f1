//! `cargo xtask bench routing`: how well each routing strategy places requests, all in one
//! run and against `random`.
//!
//! Four mock engines model what makes placement matter: the time to first token grows with
//! the requests already running (3 ms each) and with the prompt tokens the engine's prefix
//! cache does not hold (0.15 ms each). Two fixed, seeded workloads go through the gateway,
//! once per strategy, each run on a fresh stack (engines and gateway restarted, so no cache
//! or metrics window carries over):
//!
//! * `chat`: 48 multi-turn conversations (6 turns, 16 at a time), each under one of 4 long
//!   shared system prompts, every turn resending the whole history;
//! * `skewed`: 600 independent prompts (24 at a time), one in five asking for 16 times the
//!   tokens, from 8 users of very unequal activity.
//!
//! Per strategy: client-side time to first token (mean, p99), throughput, how evenly pods
//! were loaded (requests per pod against the mean; the gateway's in-flight spread, sampled),
//! the engines' prefix cache hit rate and, for `chat`, the share of follow-up turns served
//! by the pod of the conversation's first turn. Two acceptance checks close the report.
//! Bounded: every request, run and stack start has a timeout; traffic stays on 127.0.0.1.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use super::{bench_dir, block_on_until_stopped, publish_report, revision};
use crate::client::Client;
use crate::loadgen::percentile;
use crate::setup::{self, Strictness};
use crate::stack::{self, Binaries, EngineSpec, GatewaySpec, Profile, Stack};
use crate::ui;

pub(super) const MODEL: &str = "bench-model";
pub(super) const ENGINES: usize = 4;
/// Strategies the bench cannot place alone: `pd` needs prefill/decode rolesets, and the
/// bench's pods are plain engines.
const SKIPPED: &[&str] = &["pd"];
/// A weighted mix compared alongside the gateway's own strategies.
const MIX: &str = "prefix-cache:2,least-request:1";
/// The baseline every strategy is compared against.
const BASELINE: &str = "random";
/// Engine model: 10 ms to first token alone, +3 ms per other running request, +0.15 ms per
/// prompt token (word) outside the prefix cache; 2 ms per further token.
pub(super) const ENGINE_TTFT_MS: u64 = 10;
pub(super) const ENGINE_ITL_MS: u64 = 2;
const ENGINE_FLAGS: &[&str] = &[
    "--ttft-per-running-us",
    "3000",
    "--ttft-per-uncached-token-us",
    "150",
    "--prefix-cache-blocks",
    "4096",
    "--prefix-block-tokens",
    "16",
    "--max-running",
    "64",
];

pub(super) const CONVERSATIONS: usize = 48;
pub(super) const TURNS: usize = 6;
pub(super) const CHAT_CONCURRENCY: usize = 16;
pub(super) const SYSTEM_PROMPTS: usize = 4;
const CHAT_MAX_TOKENS: u32 = 8;

pub(super) const SKEWED_REQUESTS: usize = 600;
pub(super) const SKEWED_CONCURRENCY: usize = 24;
pub(super) const USERS: usize = 8;

/// One request's answer must complete within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// One workload run must complete within this.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Acceptance: share of follow-up turns `prefix-cache` keeps on the first turn's pod.
pub(super) const MIN_STICKINESS: f64 = 0.90;
/// Acceptance: most requests any pod may serve under `prefix-cache`, against the mean.
pub(super) const MAX_LOAD_RATIO: f64 = 1.5;
/// Acceptance: in-flight spread (max - min over pods) `least-request` keeps under `skewed`.
const MAX_IN_FLIGHT_SPREAD: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Workload {
    Chat,
    Skewed,
}

impl Workload {
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Skewed => "skewed",
        }
    }
}

/// One request of a workload, ready to send.
#[derive(Clone, Debug)]
pub(super) struct Job {
    body: Value,
    user: String,
    session_key: String,
    /// `(conversation, turn)` for chat turns.
    turn: Option<(usize, usize)>,
}

/// What one request measured.
#[derive(Clone, Debug)]
pub(super) struct Outcome {
    pub(super) pod: String,
    pub(super) ttft: Duration,
    pub(super) turn: Option<(usize, usize)>,
    /// When it was sent, and when its answer ended.
    pub(super) span: (Instant, Instant),
}

/// What one (strategy, workload) run measured.
#[derive(Debug)]
pub(super) struct RunResult {
    pub(super) strategy: String,
    pub(super) workload: Workload,
    pub(super) outcomes: Vec<Outcome>,
    pub(super) errors: usize,
    pub(super) first_error: Option<String>,
    pub(super) elapsed: Duration,
    /// Max − min over the pods of the requests in flight, sampled every millisecond
    /// from the clients' side while the load is saturated.
    pub(super) spreads: Vec<u32>,
    /// Sampled most in flight on one pod over the mean per pod, when any ran.
    pub(super) in_flight_ratios: Vec<f64>,
    pub(super) prefix_hits: f64,
    pub(super) prefix_queries: f64,
}

/// Runs the routing suite.
pub fn run() -> Result<()> {
    setup::run(Strictness::Lenient)?;
    let binaries = Binaries::build(Profile::Release, "bench routing")?;
    let strategies = strategies(&binaries)?;
    block_on_until_stopped(routing_async(&binaries, &strategies))
}

/// The strategies compared: every one the built gateway has (`turnstile strategies`) but
/// [`SKIPPED`], then [`MIX`], with [`BASELINE`] first.
fn strategies(binaries: &Binaries) -> Result<Vec<String>> {
    let mut command = std::process::Command::new(&binaries.gateway);
    command.arg("strategies");
    let captured = crate::procs::capture(&mut command, Duration::from_secs(10))?;
    if !captured.status.success() {
        bail!("`{} strategies` failed: {}", binaries.gateway.display(), captured.stderr.trim());
    }
    Ok(compared(&captured.stdout))
}

/// [`strategies`] from the output of `turnstile strategies`.
fn compared(listed: &str) -> Vec<String> {
    let mut names: Vec<String> = listed
        .lines()
        .map(str::trim)
        .filter(|name| !name.is_empty() && !SKIPPED.contains(name))
        .map(str::to_owned)
        .collect();
    names.sort_by_key(|name| name != BASELINE);
    names.push(MIX.to_owned());
    names
}

async fn routing_async(binaries: &Binaries, strategies: &[String]) -> Result<()> {
    let out_dir = bench_dir()?;
    let started = Instant::now();
    let client = Client::new();
    let mut results = Vec::new();
    for workload in [Workload::Chat, Workload::Skewed] {
        let jobs = match workload {
            Workload::Chat => chat_jobs(),
            Workload::Skewed => skewed_jobs(),
        };
        for strategy in strategies {
            let step = ui::step(format!("bench routing: {} with {strategy}", workload.name()));
            let result = run_one(binaries, &client, &out_dir, strategy, workload, &jobs, &Fleet::ONE).await?;
            ui::info(summary_line(&result));
            step.done();
            results.push(result);
        }
    }
    publish_report(&out_dir, "routing.md", &render_markdown(&revision(), &results, started.elapsed()))?;
    let failures = acceptance(&results).into_iter().filter_map(|check| check.failure).collect::<Vec<_>>();
    if !failures.is_empty() {
        bail!("routing acceptance failed: {}", failures.join("; "));
    }
    Ok(())
}

/// How many gateway replicas a run has, and the Redis they share.
pub(super) struct Fleet<'a> {
    pub(super) replicas: usize,
    pub(super) redis_url: Option<&'a str>,
    /// Further `turnstile serve` flags for every replica.
    pub(super) extra_args: &'a [&'a str],
}

impl Fleet<'_> {
    /// One gateway on its own.
    const ONE: Fleet<'static> = Fleet { replicas: 1, redis_url: None, extra_args: &[] };
}

/// Starts a fresh stack, runs `jobs` through the gateway replicas with `strategy` (each
/// request to the next replica in turn), and stops it.
pub(super) async fn run_one(
    binaries: &Binaries,
    client: &Client,
    out_dir: &std::path::Path,
    strategy: &str,
    workload: Workload,
    jobs: &[Job],
    fleet: &Fleet<'_>,
) -> Result<RunResult> {
    let mut stack = Stack { engines: Vec::new(), gateway: None };
    for index in 0..ENGINES {
        let spec = EngineSpec {
            pod: format!("engine-{index}"),
            model: MODEL.into(),
            ttft_ms: ENGINE_TTFT_MS,
            itl_ms: ENGINE_ITL_MS,
            tokens: CHAT_MAX_TOKENS,
            threads: None,
            extra_args: ENGINE_FLAGS.iter().map(|flag| (*flag).to_owned()).collect(),
        };
        stack.engines.push(stack::start_engine(&binaries.engine, &spec, out_dir, None).await?);
    }
    let pods_file = out_dir.join("routing-pods.yaml");
    super::write_engine_pods(&stack.engines, &pods_file)?;
    let mut extra_args = Vec::new();
    if let Some(url) = fleet.redis_url {
        extra_args.extend(["--redis-url".into(), url.into()]);
    }
    extra_args.extend(fleet.extra_args.iter().map(|arg| (*arg).into()));
    // Replicas after the first, stopped with the stack (their guards).
    let mut others = Vec::new();
    let mut proxies = Vec::new();
    for index in 0..fleet.replicas.max(1) {
        let log = out_dir.join(format!("routing-gateway-{index}.log"));
        let gateway = stack::start_gateway(
            GatewaySpec {
                routing_algorithm: Some(strategy),
                log_format: "json",
                env: vec![("RUST_LOG".into(), std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))],
                extra_args: extra_args.clone(),
                ..GatewaySpec::on_free_ports(&binaries.gateway, &pods_file, log)?
            },
            client,
        )
        .await?;
        proxies.push(gateway.listen);
        if stack.gateway.is_none() {
            stack.gateway = Some(gateway);
        } else {
            others.push(gateway);
        }
    }
    for proxy in &proxies {
        stack::wait_models_listed(client, *proxy, &[MODEL], Duration::from_secs(10)).await?;
    }

    // The spread is taken while the load is saturated: once the last job is taken, the
    // pods drain unevenly whatever the strategy did, and that tail is not its doing.
    let saturated_until = Arc::new(std::sync::OnceLock::new());
    let started = Instant::now();
    let outcomes = tokio::time::timeout(RUN_TIMEOUT, drive(client, &proxies, workload, jobs, &saturated_until))
        .await
        .map_err(|_| anyhow!("{} with {strategy} did not finish within {RUN_TIMEOUT:?}", workload.name()))?;
    let elapsed = started.elapsed();
    let until = saturated_until.get().copied().unwrap_or_else(Instant::now);
    let (spreads, in_flight_ratios) = in_flight_samples(&outcomes, started, until);
    if let Some(reason) = stack.exited_child() {
        bail!("a child died during the run: {reason}");
    }
    if let Some(status) = others.iter_mut().find_map(|gateway| gateway.child.exited()) {
        bail!("a gateway replica died during the run ({status})");
    }
    let (mut prefix_hits, mut prefix_queries) = (0.0, 0.0);
    for engine in &stack.engines {
        let text = client.get(engine.addr, "/metrics", Duration::from_secs(2)).await?.text();
        prefix_hits += sample(&text, "vllm:prefix_cache_hits_total").unwrap_or(0.0);
        prefix_queries += sample(&text, "vllm:prefix_cache_queries_total").unwrap_or(0.0);
    }
    // The children are killed with their guards; nothing is left to drain.
    drop(others);
    drop(stack);
    let (ok, errors): (Vec<_>, Vec<_>) = outcomes.into_iter().partition(Result::is_ok);
    let first_error = errors.first().and_then(|e| e.as_ref().err()).map(|e| format!("{e:#}"));
    Ok(RunResult {
        strategy: strategy.to_owned(),
        workload,
        outcomes: ok.into_iter().filter_map(Result::ok).collect(),
        errors: errors.len(),
        first_error,
        elapsed,
        spreads,
        in_flight_ratios,
        prefix_hits,
        prefix_queries,
    })
}

/// The first sample of `family` in a `/metrics` text.
fn sample(text: &str, family: &str) -> Option<f64> {
    text.lines()
        .filter(|line| line.starts_with(family))
        .find_map(|line| line.rsplit_once(' ').and_then(|(_, value)| value.parse().ok()))
}

/// Sends the jobs through the gateway. Chat: workers take whole conversations (turns in
/// order); skewed: workers take single requests.
/// `saturated_until` is set when a worker first finds no job left.
async fn drive(
    client: &Client,
    proxies: &[SocketAddr],
    workload: Workload,
    jobs: &[Job],
    saturated_until: &Arc<std::sync::OnceLock<Instant>>,
) -> Vec<Result<Outcome>> {
    let groups: Vec<Vec<Job>> = match workload {
        Workload::Chat => {
            let conversations = jobs.iter().filter_map(|job| job.turn).map(|(c, _)| c + 1).max().unwrap_or(0);
            let mut by_conversation: Vec<Vec<Job>> = vec![Vec::new(); conversations];
            for job in jobs {
                if let Some((conversation, _)) = job.turn {
                    by_conversation[conversation].push(job.clone());
                }
            }
            by_conversation
        }
        Workload::Skewed => jobs.iter().map(|job| vec![job.clone()]).collect(),
    };
    let concurrency = match workload {
        Workload::Chat => CHAT_CONCURRENCY,
        Workload::Skewed => SKEWED_CONCURRENCY,
    };
    let groups = Arc::new(groups);
    let next = Arc::new(AtomicUsize::new(0));
    // Clients spread their requests over the replicas round-robin, as a Service does.
    let proxies: Arc<[SocketAddr]> = Arc::from(proxies);
    let turn = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, groups, next) = (client.clone(), Arc::clone(&groups), Arc::clone(&next));
        let (proxies, turn) = (Arc::clone(&proxies), Arc::clone(&turn));
        let saturated_until = Arc::clone(saturated_until);
        workers.spawn(async move {
            let mut outcomes = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(group) = groups.get(index) else {
                    let _ = saturated_until.set(Instant::now());
                    break;
                };
                for job in group {
                    let proxy = proxies[turn.fetch_add(1, Ordering::Relaxed) % proxies.len()];
                    outcomes.push(send(&client, proxy, job).await);
                }
            }
            outcomes
        });
    }
    let mut all = Vec::new();
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(outcomes) => all.extend(outcomes),
            Err(err) => all.push(Err(anyhow!("a load worker failed: {err}"))),
        }
    }
    all
}

/// Sends one streaming request and times its first token.
async fn send(client: &Client, proxy: SocketAddr, job: &Job) -> Result<Outcome> {
    let started = Instant::now();
    let headers = [("user", job.user.as_str()), ("x-aibrix-session-key", job.session_key.as_str())];
    let request = crate::client::json_request(proxy, "/v1/chat/completions", &headers, &job.body)?;
    let response = client.send_streaming(request, REQUEST_TIMEOUT).await?;
    let status = response.status();
    let pod = crate::client::header_text(response.headers(), "target-pod");
    if !status.is_success() {
        bail!("gateway answered {status}");
    }
    let mut body = response.into_body();
    let mut ttft = None;
    let deadline = started + REQUEST_TIMEOUT;
    loop {
        let frame = tokio::time::timeout_at(deadline.into(), body.frame())
            .await
            .map_err(|_| anyhow!("no complete answer within {REQUEST_TIMEOUT:?}"))?;
        match frame {
            None => break,
            Some(Ok(frame)) => {
                if ttft.is_none() && frame.data_ref().is_some_and(|data| !data.is_empty()) {
                    ttft = Some(started.elapsed());
                }
            }
            Some(Err(err)) => bail!("stream broken: {err}"),
        }
    }
    Ok(Outcome {
        pod,
        ttft: ttft.unwrap_or_else(|| started.elapsed()),
        turn: job.turn,
        span: (started, Instant::now()),
    })
}

/// Every millisecond from `from` to `until`, the requests in flight on each pod as the
/// clients saw them (sent, not yet answered in full), over all replicas at once: the
/// spread (max − min) and the most over the mean, when any ran.
fn in_flight_samples(outcomes: &[Result<Outcome>], from: Instant, until: Instant) -> (Vec<u32>, Vec<f64>) {
    let served: Vec<&Outcome> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
    let pods: Vec<String> = (0..ENGINES).map(|i| format!("engine-{i}")).collect();
    let (mut spreads, mut ratios) = (Vec::new(), Vec::new());
    let mut at = from;
    while at < until {
        let counts: Vec<u32> = pods
            .iter()
            .map(|pod| {
                let running = served.iter().filter(|o| &o.pod == pod && o.span.0 <= at && at < o.span.1).count();
                u32::try_from(running).unwrap_or(u32::MAX)
            })
            .collect();
        let (max, min) = (counts.iter().max().copied().unwrap_or(0), counts.iter().min().copied().unwrap_or(0));
        spreads.push(max - min);
        let total: u32 = counts.iter().sum();
        if total > 0 {
            ratios.push(f64::from(max) / (f64::from(total) / counts.len() as f64));
        }
        at += Duration::from_millis(1);
    }
    (spreads, ratios)
}

/// A tiny deterministic generator (splitmix64), so every strategy gets the same workload.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform in 0..1.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const WORDS: &[&str] = &[
    "gateway",
    "engine",
    "token",
    "prefix",
    "cache",
    "batch",
    "latency",
    "request",
    "model",
    "routing",
    "kernel",
    "stream",
    "answer",
    "question",
    "context",
    "window",
    "weight",
    "memory",
    "tensor",
    "layer",
    "policy",
    "budget",
    "replica",
    "cluster",
    "signal",
    "vector",
    "scalar",
    "matrix",
    "prompt",
    "system",
    "careful",
    "precise",
    "brief",
    "helpful",
    "correct",
    "quickly",
    "slowly",
    "always",
    "never",
    "between",
    "across",
    "within",
    "around",
    "before",
    "after",
    "during",
    "because",
    "although",
    "therefore",
    "however",
];

fn words(rng: &mut Rng, n: usize) -> String {
    (0..n).map(|_| WORDS[rng.below(WORDS.len())]).collect::<Vec<_>>().join(" ")
}

/// 48 conversations of 6 turns under 4 shared system prompts (~180 words each); each turn
/// adds a ~25-word question to the history, each answer ~25 words.
pub(super) fn chat_jobs() -> Vec<Job> {
    chat_jobs_of(CONVERSATIONS)
}

/// [`chat_jobs`] with `conversations` conversations.
pub(super) fn chat_jobs_of(conversations: usize) -> Vec<Job> {
    let mut rng = Rng(0x5eed_c4a7);
    let systems: Vec<String> = (0..SYSTEM_PROMPTS)
        .map(|s| format!("System prompt {s}: you are assistant {s} of the routing benchmark. {}", words(&mut rng, 180)))
        .collect();
    let mut jobs = Vec::new();
    for conversation in 0..conversations {
        let mut messages = vec![json!({"role": "system", "content": systems[conversation % SYSTEM_PROMPTS]})];
        for turn in 0..TURNS {
            let question = format!("Conversation {conversation} question {turn}: {}", words(&mut rng, 25));
            messages.push(json!({"role": "user", "content": question}));
            jobs.push(Job {
                body: json!({"model": MODEL, "messages": messages, "max_tokens": CHAT_MAX_TOKENS, "stream": true}),
                user: format!("user-{}", conversation % USERS),
                session_key: format!("conversation-{conversation}"),
                turn: Some((conversation, turn)),
            });
            let answer = format!("Answer {turn} of conversation {conversation}: {}", words(&mut rng, 25));
            messages.push(json!({"role": "assistant", "content": answer}));
        }
    }
    jobs
}

/// 600 independent ~40-word prompts; one in five asks for 64 tokens, the rest for 4; users
/// follow a Zipf law (user-0 sends about a third of the traffic).
pub(super) fn skewed_jobs() -> Vec<Job> {
    let mut rng = Rng(0x5eed_5ce3);
    let weights: Vec<f64> = (1..=USERS).map(|k| 1.0 / k as f64).collect();
    let total: f64 = weights.iter().sum();
    (0..SKEWED_REQUESTS)
        .map(|i| {
            let mut pick = rng.unit() * total;
            let user = weights.iter().position(|w| {
                pick -= w;
                pick <= 0.0
            });
            let user = format!("user-{}", user.unwrap_or(USERS - 1));
            let max_tokens = if rng.unit() < 0.2 { 64 } else { 4 };
            let prompt = format!("Request {i}: {}", words(&mut rng, 40));
            Job {
                body: json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                             "max_tokens": max_tokens, "stream": true}),
                session_key: user.clone(),
                user,
                turn: None,
            }
        })
        .collect()
}

/// Aggregates of one run, as reported.
pub(super) struct Stats {
    pub(super) ok: usize,
    pub(super) ttft_mean_ms: f64,
    pub(super) ttft_p99_ms: f64,
    pub(super) requests_per_second: f64,
    /// Most requests on one pod over the mean per pod.
    pub(super) load_ratio: f64,
    pub(super) spread_p99: u32,
    pub(super) spread_max: u32,
    pub(super) hit_rate: Option<f64>,
    /// Chat: share of follow-up turns on the first turn's pod.
    pub(super) stickiness: Option<f64>,
}

pub(super) fn stats(result: &RunResult) -> Stats {
    let mut ttfts: Vec<u32> =
        result.outcomes.iter().map(|o| u32::try_from(o.ttft.as_micros()).unwrap_or(u32::MAX)).collect();
    ttfts.sort_unstable();
    let ok = result.outcomes.len();
    let ttft_mean_ms = ttfts.iter().map(|&t| f64::from(t)).sum::<f64>() / ok.max(1) as f64 / 1000.0;
    let ttft_p99_ms = percentile(&ttfts, 99.0).map_or(0.0, |t| f64::from(t) / 1000.0);
    let mut per_pod: HashMap<&str, usize> = HashMap::new();
    for outcome in &result.outcomes {
        *per_pod.entry(outcome.pod.as_str()).or_default() += 1;
    }
    let mean = ok as f64 / ENGINES as f64;
    let load_ratio = per_pod.values().copied().max().unwrap_or(0) as f64 / mean.max(f64::EPSILON);
    let mut spreads = result.spreads.clone();
    spreads.sort_unstable();
    let stickiness = (result.workload == Workload::Chat).then(|| {
        let first: HashMap<usize, &str> = result
            .outcomes
            .iter()
            .filter_map(|o| match o.turn {
                Some((conversation, 0)) => Some((conversation, o.pod.as_str())),
                _ => None,
            })
            .collect();
        let follow_ups: Vec<bool> = result
            .outcomes
            .iter()
            .filter_map(|o| match o.turn {
                Some((conversation, turn)) if turn > 0 => Some(first.get(&conversation) == Some(&o.pod.as_str())),
                _ => None,
            })
            .collect();
        follow_ups.iter().filter(|&&same| same).count() as f64 / follow_ups.len().max(1) as f64
    });
    Stats {
        ok,
        ttft_mean_ms,
        ttft_p99_ms,
        requests_per_second: ok as f64 / result.elapsed.as_secs_f64().max(f64::EPSILON),
        load_ratio,
        spread_p99: percentile(&spreads, 99.0).unwrap_or(0),
        spread_max: spreads.last().copied().unwrap_or(0),
        hit_rate: (result.prefix_queries > 0.0).then(|| result.prefix_hits / result.prefix_queries),
        stickiness,
    }
}

pub(super) fn summary_line(result: &RunResult) -> String {
    let s = stats(result);
    let mut line = format!(
        "{} ok, {} errors, TTFT mean {:.1} ms p99 {:.1} ms, {:.0} req/s, max pod load {:.2}× mean, in-flight spread p99 {} max {}",
        s.ok,
        result.errors,
        s.ttft_mean_ms,
        s.ttft_p99_ms,
        s.requests_per_second,
        s.load_ratio,
        s.spread_p99,
        s.spread_max
    );
    if let Some(hit) = s.hit_rate {
        let _ = write!(line, ", prefix hits {:.0}%", hit * 100.0);
    }
    if let Some(sticky) = s.stickiness {
        let _ = write!(line, ", follow-ups on first pod {:.0}%", sticky * 100.0);
    }
    if let Some(err) = &result.first_error {
        let _ = write!(line, " (first error: {err})");
    }
    line
}

/// A run that measured `outcomes` and `spreads` in one second, for tests.
#[cfg(test)]
pub(super) fn run_result(strategy: &str, workload: Workload, outcomes: Vec<Outcome>, spreads: Vec<u32>) -> RunResult {
    RunResult {
        strategy: strategy.to_owned(),
        workload,
        outcomes,
        errors: 0,
        first_error: None,
        elapsed: Duration::from_secs(1),
        spreads,
        in_flight_ratios: Vec::new(),
        prefix_hits: 0.0,
        prefix_queries: 0.0,
    }
}

/// One acceptance check and, if it failed, why.
pub(super) struct Check {
    pub(super) description: String,
    pub(super) failure: Option<String>,
}

/// Appends an acceptance section, a PASS or FAIL line per check.
pub(super) fn write_checks(out: &mut String, checks: Vec<Check>) {
    out.push_str("## Acceptance\n\n");
    for check in checks {
        match &check.failure {
            None => {
                let _ = writeln!(out, "- PASS: {}", check.description);
            }
            Some(why) => {
                let _ = writeln!(out, "- FAIL: {} — {why}", check.description);
            }
        }
    }
}

fn acceptance(results: &[RunResult]) -> Vec<Check> {
    let find = |strategy: &str, workload: Workload| {
        results.iter().find(|r| r.strategy == strategy && r.workload == workload).map(stats)
    };
    let mut checks = Vec::new();
    let description = format!(
        "chat, prefix-cache: ≥ {:.0}% of follow-up turns on the first turn's pod, no pod above {MAX_LOAD_RATIO}× the mean load",
        MIN_STICKINESS * 100.0
    );
    let failure = match find("prefix-cache", Workload::Chat) {
        None => Some("prefix-cache did not run".to_owned()),
        Some(s) => {
            let sticky = s.stickiness.unwrap_or(0.0);
            (sticky < MIN_STICKINESS || s.load_ratio > MAX_LOAD_RATIO).then(|| {
                format!("follow-ups on first pod {:.1}%, max pod load {:.2}× mean", sticky * 100.0, s.load_ratio)
            })
        }
    };
    checks.push(Check { description, failure });
    let description =
        format!("skewed, least-request: in-flight spread within {MAX_IN_FLIGHT_SPREAD} (p99 of the samples)");
    let failure = match find("least-request", Workload::Skewed) {
        None => Some("least-request did not run".to_owned()),
        Some(s) => (s.spread_p99 > MAX_IN_FLIGHT_SPREAD)
            .then(|| format!("in-flight spread p99 {} (max {})", s.spread_p99, s.spread_max)),
    };
    checks.push(Check { description, failure });
    checks
}

fn render_markdown(revision: &str, results: &[RunResult], elapsed: Duration) -> String {
    let mut out = format!("# Turnstile routing benchmark ({revision})\n\n");
    let _ = writeln!(
        out,
        "{ENGINES} mock engines (TTFT {ENGINE_TTFT_MS} ms + 3 ms per other running request + 0.15 ms per prompt \
         token outside the engine's prefix cache; {ENGINE_ITL_MS} ms per further token), one gateway, each run on \
         a fresh stack; client-side streaming TTFT. `chat`: {CONVERSATIONS} conversations × {TURNS} turns under \
         {SYSTEM_PROMPTS} shared system prompts, {CHAT_CONCURRENCY} at a time. `skewed`: {SKEWED_REQUESTS} \
         independent prompts, 20% asking for 64 tokens and 80% for 4, {USERS} Zipf-distributed users, \
         {SKEWED_CONCURRENCY} at a time. Load = most requests on one pod / mean per pod; in-flight spread = max − \
         min of the requests in flight per pod as the clients see them, sampled every millisecond until the job queue runs dry \
         (the drain after it is uneven whatever the strategy). Whole suite: {}.\n",
        ui::human(elapsed)
    );
    for workload in [Workload::Chat, Workload::Skewed] {
        let rows: Vec<&RunResult> = results.iter().filter(|r| r.workload == workload).collect();
        let baseline = rows.iter().find(|r| r.strategy == BASELINE).map(|r| stats(r));
        let _ = writeln!(out, "## {}\n", workload.name());
        out.push_str(
            "| strategy | ok | errors | TTFT mean ms | vs random | TTFT p99 ms | req/s | max load / mean | \
             in-flight spread p99 / max | prefix hit rate | follow-ups on first pod |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for result in rows {
            let s = stats(result);
            let versus = baseline
                .as_ref()
                .filter(|b| b.ttft_mean_ms > 0.0)
                .map_or_else(|| "-".to_owned(), |b| format!("{:.2}", s.ttft_mean_ms / b.ttft_mean_ms));
            let percent = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{:.1}%", v * 100.0));
            let _ = writeln!(
                out,
                "| `{}` | {} | {} | {:.1} | {versus} | {:.1} | {:.0} | {:.2} | {} / {} | {} | {} |",
                result.strategy,
                s.ok,
                result.errors,
                s.ttft_mean_ms,
                s.ttft_p99_ms,
                s.requests_per_second,
                s.load_ratio,
                s.spread_p99,
                s.spread_max,
                percent(s.hit_rate),
                percent(s.stickiness),
            );
        }
        out.push('\n');
    }
    write_checks(&mut out, acceptance(results));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(pod: &str, ms: u64, turn: Option<(usize, usize)>) -> Outcome {
        let now = Instant::now();
        Outcome { pod: pod.into(), ttft: Duration::from_millis(ms), turn, span: (now, now) }
    }

    fn result(strategy: &'static str, workload: Workload, outcomes: Vec<Outcome>, spreads: Vec<u32>) -> RunResult {
        RunResult { prefix_hits: 30.0, prefix_queries: 100.0, ..run_result(strategy, workload, outcomes, spreads) }
    }

    #[test]
    fn in_flight_is_counted_per_pod_from_the_clients_side() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let served = |pod: &str, from: u64, to: u64| {
            Ok(Outcome { pod: pod.into(), ttft: Duration::ZERO, turn: None, span: (ms(from), ms(to)) })
        };
        // engine-0 runs two requests over 0..10 ms, engine-1 one over 0..5 ms; the others none.
        let outcomes = vec![served("engine-0", 0, 10), served("engine-0", 0, 10), served("engine-1", 0, 5)];
        let (spreads, ratios) = in_flight_samples(&outcomes, t0, ms(10));
        assert_eq!(spreads.len(), 10);
        assert!(spreads.iter().all(|&s| s == 2), "{spreads:?}");
        assert_eq!(ratios[0], 2.0 / (3.0 / 4.0));
        assert_eq!(ratios[9], 2.0 / (2.0 / 4.0));
    }

    #[test]
    fn compares_every_listed_strategy_but_pd_with_random_first_and_the_mix_last() {
        assert_eq!(
            compared("least-request\nrandom\n\npd\nprefix-cache\n"),
            ["random", "least-request", "prefix-cache", MIX]
        );
    }

    #[test]
    fn workloads_are_deterministic_and_shaped() {
        let chat = chat_jobs();
        assert_eq!(chat.len(), CONVERSATIONS * TURNS);
        assert_eq!(chat[0].body, chat_jobs()[0].body, "seeded: the same for every strategy");
        let last_turn = &chat[TURNS - 1].body["messages"];
        assert_eq!(last_turn.as_array().map(Vec::len), Some(1 + 2 * TURNS - 1), "system + history + question");
        assert_eq!(chat[0].body["messages"][0], chat[SYSTEM_PROMPTS * TURNS].body["messages"][0], "shared system");
        let skewed = skewed_jobs();
        assert_eq!(skewed.len(), SKEWED_REQUESTS);
        let long = skewed.iter().filter(|j| j.body["max_tokens"] == 64).count();
        assert!((80..160).contains(&long), "about a fifth long: {long}");
        let heaviest = skewed.iter().filter(|j| j.user == "user-0").count();
        assert!(heaviest > SKEWED_REQUESTS / 5, "Zipf: user-0 is the heaviest ({heaviest})");
    }

    #[test]
    fn stats_and_acceptance() {
        let mut chat = Vec::new();
        for conversation in 0..4 {
            for turn in 0..5 {
                // Conversation 3 moves on its last turn.
                let pod = if conversation == 3 && turn == 4 { "b" } else { ["a", "b", "c", "d"][conversation] };
                chat.push(outcome(pod, 10 + turn as u64, Some((conversation, turn))));
            }
        }
        let results = vec![
            result("prefix-cache", Workload::Chat, chat, vec![0, 1]),
            result("least-request", Workload::Skewed, vec![outcome("a", 5, None)], vec![0, 1, 3]),
        ];
        let s = stats(&results[0]);
        assert!((s.stickiness.unwrap() - 15.0 / 16.0).abs() < 1e-9);
        assert!((s.load_ratio - 6.0 / 5.0).abs() < 1e-9);
        assert!((s.ttft_mean_ms - 12.0).abs() < 1e-9);
        assert_eq!(s.hit_rate, Some(0.3));
        let checks = acceptance(&results);
        assert!(checks[0].failure.is_none(), "93.75% sticky, 1.2× load");
        assert!(checks[1].failure.is_some(), "spread p99 3 > 2");
        let markdown = render_markdown("abc", &results, Duration::from_secs(90));
        assert!(markdown.contains("| `prefix-cache` | 20 | 0 | 12.0 | - |"), "{markdown}");
        assert!(markdown.contains("- PASS: chat, prefix-cache"), "{markdown}");
        assert!(markdown.contains("- FAIL: skewed, least-request"), "{markdown}");
    }
}
