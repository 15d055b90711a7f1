//! `cargo xtask bench replicas`: routing as one brain across 1, 2 and 4 gateway replicas.
//!
//! The routing bench's engines (time to first token grows with the requests running and
//! shrinks with prefix reuse) and workloads, with the clients spreading their requests over
//! the replicas round-robin, as a Service does: a conversation's turns land on different
//! replicas. Per replica count, each run on a fresh stack and a fresh Redis the replicas
//! share (userspace only):
//!
//! * `chat` with `prefix-cache`: follow-up turns served by the conversation's first pod;
//! * `skewed` with `least-request`: how evenly the fleet's requests in flight spread.
//!
//! Per run: follow-ups on the first pod, most requests on one pod and most in flight on one
//! pod against the mean, the in-flight spread (max − min), client TTFT mean and p99, and
//! Redis calls per request (every command the replicas sent, scrape sharing included). The
//! acceptance checks compare 4 replicas with 1. Bounded: every request, run and start has a
//! timeout, traffic stays on 127.0.0.1.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::routing::{self, Check, Fleet, RunResult, Workload};
use super::{bench_dir, block_on_until_stopped, publish_report, revision};
use crate::client::Client;
use crate::loadgen::percentile;
use crate::procs;
use crate::setup::{self, Strictness};
use crate::stack::{Binaries, Profile};
use crate::ui;

/// Replica counts compared, the first being the reference, each sharing routing state.
const REPLICAS: &[usize] = &[1, 2, 4];
/// Then the most replicas again with `--routing-state-sharing off`: what sharing buys.
/// Each workload with the strategy it is run with.
const RUNS: &[(Workload, &str)] = &[(Workload::Chat, "prefix-cache"), (Workload::Skewed, "least-request")];
/// Chat conversations per run: four times the routing bench's, so that a run lasts a few
/// seconds and the placement of the first ones (all started at once) weighs less.
const CONVERSATIONS: usize = 4 * routing::CONVERSATIONS;
/// Acceptance: mean TTFT of the most replicas against one replica.
const MAX_TTFT_RATIO: f64 = 1.10;
/// Acceptance: the spread of requests in flight over the pods (most on one pod over the
/// mean, p99 of the samples) with the most replicas against one replica.
const MAX_SPREAD_RATIO: f64 = 2.0;

/// One run's measurements.
struct Row {
    replicas: usize,
    /// Routing state shared (`--routing-state-sharing on`).
    shared: bool,
    result: RunResult,
    redis_calls: Calls,
}

/// Runs the replicas suite.
pub fn run() -> Result<()> {
    setup::run(Strictness::Lenient)?;
    let redis = procs::find_program("redis-server")
        .ok_or_else(|| anyhow!("redis-server is not installed (`cargo xtask setup` installs it)"))?;
    let binaries = Binaries::build(Profile::Release, "bench replicas")?;
    block_on_until_stopped(replicas_async(binaries, redis))
}

async fn replicas_async(binaries: Binaries, redis: std::path::PathBuf) -> Result<()> {
    let out_dir = bench_dir()?;
    let started = Instant::now();
    let client = Client::new();
    let mut rows = Vec::new();
    for &(workload, strategy) in RUNS {
        let jobs = match workload {
            Workload::Chat => routing::chat_jobs_of(CONVERSATIONS),
            Workload::Skewed => routing::skewed_jobs(),
        };
        let most = REPLICAS[REPLICAS.len() - 1];
        let runs = REPLICAS.iter().map(|&replicas| (replicas, true)).chain([(most, false)]);
        for (replicas, shared) in runs {
            let label =
                if shared { format!("{replicas} replicas") } else { format!("{replicas} replicas, sharing off") };
            let step = ui::step(format!("bench replicas: {} with {strategy}, {label}", workload.name()));
            let run_dir =
                out_dir.join(format!("replicas-{}-{replicas}{}", workload.name(), if shared { "" } else { "-off" }));
            std::fs::create_dir_all(&run_dir)?;
            let (_redis, port) = super::fleet::start_redis(&redis, &run_dir, None).await?;
            let url = format!("redis://127.0.0.1:{port}/");
            let off: &[&str] = if shared { &[] } else { &["--routing-state-sharing", "off"] };
            let fleet = Fleet { replicas, redis_url: Some(&url), extra_args: off };
            let before = redis_calls(port).await?;
            let result = routing::run_one(&binaries, &client, &run_dir, strategy, workload, &jobs, &fleet).await?;
            let redis_calls = redis_calls(port).await?.since(before);
            ui::info(format!("{label}: {}", routing::summary_line(&result)));
            ui::info(format!("requests per pod: {}", per_pod(&result)));
            step.done();
            rows.push(Row { replicas, shared, result, redis_calls });
        }
    }
    let markdown = render_markdown(&revision(), &rows, started.elapsed());
    publish_report(&out_dir, "replicas.md", &markdown)?;
    let failures: Vec<String> = acceptance(&rows).into_iter().filter_map(|c| c.failure).collect();
    if !failures.is_empty() {
        bail!("replicas acceptance failed: {}", failures.join("; "));
    }
    Ok(())
}

/// Commands Redis on `port` has run since it started, per command (`INFO commandstats`).
async fn redis_calls(port: u16) -> Result<Calls> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"INFO commandstats\r\n").await?;
        // A bulk string: `$<len>\r\n<text>\r\n`.
        let mut answer = Vec::new();
        let mut buffer = [0_u8; 4096];
        loop {
            let n = stream.read(&mut buffer).await?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buffer[..n]);
            let text = String::from_utf8_lossy(&answer);
            if let Some((header, rest)) = text.split_once("\r\n")
                && let Some(length) = header.strip_prefix('$').and_then(|l| l.parse::<usize>().ok())
                && rest.len() >= length
            {
                break;
            }
        }
        std::io::Result::Ok(String::from_utf8_lossy(&answer).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| anyhow!("Redis on port {port} did not answer INFO"))??;
    let mut calls = Calls::default();
    for line in text.lines() {
        let Some((name, stats)) = line.strip_prefix("cmdstat_").and_then(|l| l.split_once(':')) else { continue };
        let count: u64 =
            stats.split(',').find_map(|field| field.strip_prefix("calls=")).and_then(|n| n.parse().ok()).unwrap_or(0);
        calls.all += count;
        if matches!(name, "xadd" | "xread" | "xrange") {
            calls.stream += count;
        }
    }
    Ok(calls)
}

/// Redis commands: all of them, and those on the decisions stream.
#[derive(Clone, Copy, Debug, Default)]
struct Calls {
    all: u64,
    stream: u64,
}

impl Calls {
    fn since(self, before: Self) -> Self {
        Self { all: self.all.saturating_sub(before.all), stream: self.stream.saturating_sub(before.stream) }
    }
}

/// Requests each pod served, in pod order (`a/b/c/d`).
fn per_pod(result: &RunResult) -> String {
    (0..routing::ENGINES)
        .map(|i| {
            let pod = format!("engine-{i}");
            result.outcomes.iter().filter(|o| o.pod == pod).count().to_string()
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// What a row reports beyond the routing bench's figures.
struct Figures {
    stats: routing::Stats,
    in_flight_ratio_p99: f64,
    /// Mean over the samples of max − min requests in flight over the pods.
    spread_mean: f64,
    redis_per_request: f64,
    stream_per_request: f64,
}

fn figures(row: &Row) -> Figures {
    let stats = routing::stats(&row.result);
    let mut ratios: Vec<u32> = row.result.in_flight_ratios.iter().map(|r| (r * 1000.0) as u32).collect();
    ratios.sort_unstable();
    let in_flight_ratio_p99 = percentile(&ratios, 99.0).map_or(0.0, |r| f64::from(r) / 1000.0);
    let redis_per_request = row.redis_calls.all as f64 / stats.ok.max(1) as f64;
    let stream_per_request = row.redis_calls.stream as f64 / stats.ok.max(1) as f64;
    let spreads = &row.result.spreads;
    let spread_mean = spreads.iter().map(|&s| f64::from(s)).sum::<f64>() / spreads.len().max(1) as f64;
    Figures { stats, in_flight_ratio_p99, spread_mean, redis_per_request, stream_per_request }
}

fn acceptance(rows: &[Row]) -> Vec<Check> {
    let find = |workload: Workload, replicas: usize| {
        rows.iter().find(|r| r.result.workload == workload && r.replicas == replicas && r.shared).map(figures)
    };
    let (one, most) = (REPLICAS[0], REPLICAS[REPLICAS.len() - 1]);
    let mut checks = Vec::new();
    let description = format!(
        "chat, prefix-cache, {most} replicas: ≥ {:.0}% of follow-up turns on the first pod, no pod above {}× the \
         mean load, mean TTFT within {:.0}% of {one} replica's",
        routing::MIN_STICKINESS * 100.0,
        routing::MAX_LOAD_RATIO,
        (MAX_TTFT_RATIO - 1.0) * 100.0
    );
    let failure = match (find(Workload::Chat, one), find(Workload::Chat, most)) {
        (Some(base), Some(f)) => {
            let sticky = f.stats.stickiness.unwrap_or(0.0);
            let ttft = f.stats.ttft_mean_ms / base.stats.ttft_mean_ms.max(f64::EPSILON);
            let errors = rows.iter().map(|r| r.result.errors).sum::<usize>();
            (sticky < routing::MIN_STICKINESS
                || f.stats.load_ratio > routing::MAX_LOAD_RATIO
                || ttft > MAX_TTFT_RATIO
                || errors > 0)
                .then(|| {
                    format!(
                        "follow-ups {:.1}%, max pod load {:.2}× mean, TTFT {ttft:.2}× one replica's, {errors} errors",
                        sticky * 100.0,
                        f.stats.load_ratio
                    )
                })
        }
        _ => Some("a chat run is missing".to_owned()),
    };
    checks.push(Check { description, failure });
    let description = format!(
        "skewed, least-request, {most} replicas: in-flight spread (most on one pod / mean, p99) within \
         {MAX_SPREAD_RATIO}× {one} replica's"
    );
    let failure = match (find(Workload::Skewed, one), find(Workload::Skewed, most)) {
        (Some(base), Some(f)) => (f.in_flight_ratio_p99 > MAX_SPREAD_RATIO * base.in_flight_ratio_p99).then(|| {
            format!("in flight max / mean p99 {:.2} against {:.2}", f.in_flight_ratio_p99, base.in_flight_ratio_p99)
        }),
        _ => Some("a skewed run is missing".to_owned()),
    };
    checks.push(Check { description, failure });
    checks
}

const CHART_WIDTH: usize = 40;

fn render_markdown(revision: &str, rows: &[Row], elapsed: Duration) -> String {
    let mut out = format!("# Turnstile replicas benchmark ({revision})\n\n");
    let _ = writeln!(
        out,
        "The routing bench's {} mock engines and workloads (see `cargo xtask bench routing`), through 1, 2 and 4 \
         gateway replicas sharing one Redis (`--redis-url`, userspace only), and 4 again with \
         `--routing-state-sharing off` (each replica routing from what it alone saw), every request sent to the \
         next replica in turn. `chat` ({} conversations × {} turns, each turn resending the history) runs with `prefix-cache`, \
         `skewed` ({} independent prompts from {} users of unequal activity) with `least-request`. Each run on \
         fresh engines, replicas and Redis. Load = most requests served by one pod / mean per pod; in flight = \
         the requests in flight per pod as the clients see them, over all replicas at once, sampled every \
         millisecond while the load is saturated (most on one pod / mean, p99; spread max − min, mean and p99); \
         Redis calls = every command Redis ran during the run per request (scrape sharing and in-flight \
         reports included), in brackets those on the decisions stream (`XADD`, `XREAD`, `XRANGE`). Whole \
         suite: {}.\n",
        routing::ENGINES,
        CONVERSATIONS,
        routing::TURNS,
        routing::SKEWED_REQUESTS,
        routing::USERS,
        ui::human(elapsed)
    );
    out.push_str(
        "| workload | strategy | replicas | ok | errors | follow-ups on first pod | max load / mean | \
         in flight max / mean p99 | in-flight spread mean / p99 | TTFT mean ms | TTFT p99 ms | Redis calls / request (stream) |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let f = figures(row);
        let sticky = f.stats.stickiness.map_or_else(|| "-".to_owned(), |s| format!("{:.1}%", s * 100.0));
        let _ = writeln!(
            out,
            "| {} | `{}` | {} | {} | {} | {sticky} | {:.2} | {:.2} | {:.2} / {} | {:.1} | {:.1} | {:.2} ({:.2}) |",
            row.result.workload.name(),
            row.result.strategy,
            if row.shared { row.replicas.to_string() } else { format!("{}, sharing off", row.replicas) },
            f.stats.ok,
            row.result.errors,
            f.stats.load_ratio,
            f.in_flight_ratio_p99,
            f.spread_mean,
            f.stats.spread_p99,
            f.stats.ttft_mean_ms,
            f.stats.ttft_p99_ms,
            f.redis_per_request,
            f.stream_per_request,
        );
    }
    out.push('\n');
    let chart = |out: &mut String, title: &str, workload: Workload, value: &dyn Fn(&Figures) -> f64| {
        let values: Vec<(String, f64)> = rows
            .iter()
            .filter(|r| r.result.workload == workload)
            .map(|r| {
                let label = format!("{} replicas{}", r.replicas, if r.shared { "" } else { ", not sharing" });
                (label, value(&figures(r)))
            })
            .collect();
        let top = values.iter().map(|(_, v)| *v).fold(f64::EPSILON, f64::max);
        let _ = writeln!(out, "{title}");
        for (label, v) in values {
            let length = ((v / top) * CHART_WIDTH as f64).round() as usize;
            let _ = writeln!(out, "  {label:>24} |{:<CHART_WIDTH$}| {v:.1}", "█".repeat(length));
        }
    };
    out.push_str("```text\n");
    chart(&mut out, "chat, prefix-cache: follow-up turns on the first pod, %", Workload::Chat, &|f| {
        f.stats.stickiness.unwrap_or(0.0) * 100.0
    });
    chart(&mut out, "chat, prefix-cache: TTFT mean, ms", Workload::Chat, &|f| f.stats.ttft_mean_ms);
    chart(&mut out, "skewed, least-request: TTFT mean, ms", Workload::Skewed, &|f| f.stats.ttft_mean_ms);
    out.push_str("```\n\n");
    routing::write_checks(&mut out, acceptance(rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::routing::Outcome;

    fn row(replicas: usize, workload: Workload, pods: &[&str], ttft_ms: u64, spreads: Vec<u32>) -> Row {
        let outcomes = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| Outcome {
                pod: (*pod).to_owned(),
                ttft: Duration::from_millis(ttft_ms),
                // Two conversations of two turns: 0,1 then 0,1.
                turn: (workload == Workload::Chat).then_some((i / 2, i % 2)),
                span: (Instant::now(), Instant::now()),
            })
            .collect();
        let result =
            RunResult { in_flight_ratios: vec![1.0, 2.0], ..routing::run_result("s", workload, outcomes, spreads) };
        Row { replicas, shared: true, result, redis_calls: Calls { all: 40, stream: 8 } }
    }

    #[test]
    fn four_replicas_pass_when_they_keep_affinity_spread_and_ttft() {
        let pods = ["engine-0", "engine-0", "engine-1", "engine-1", "engine-2", "engine-2", "engine-3", "engine-3"];
        let rows = vec![
            row(1, Workload::Chat, &pods, 30, vec![0]),
            row(4, Workload::Chat, &pods, 32, vec![0]),
            row(1, Workload::Skewed, &pods, 30, vec![1, 1]),
            row(4, Workload::Skewed, &pods, 30, vec![2, 2]),
        ];
        assert!(acceptance(&rows).iter().all(|c| c.failure.is_none()));
        let markdown = render_markdown("abc", &rows, Duration::from_secs(5));
        assert!(
            markdown
                .contains("| chat | `s` | 4 | 8 | 0 | 100.0% | 1.00 | 2.00 | 0.00 / 0 | 32.0 | 32.0 | 5.00 (1.00) |"),
            "{markdown}"
        );
        assert!(markdown.contains("- PASS: skewed"), "{markdown}");

        // A conversation that moved pod, a slower fleet, a wider spread: each fails.
        let moved = ["engine-0", "engine-1", "engine-1", "engine-1", "engine-2", "engine-2", "engine-3", "engine-3"];
        let mut wide = row(4, Workload::Skewed, &pods, 30, vec![3, 3]);
        wide.result.in_flight_ratios = vec![4.5, 4.5];
        let rows = vec![
            row(1, Workload::Chat, &pods, 30, vec![0]),
            row(4, Workload::Chat, &moved, 34, vec![0]),
            row(1, Workload::Skewed, &pods, 30, vec![1, 1]),
            wide,
        ];
        let failures: Vec<String> = acceptance(&rows).into_iter().filter_map(|c| c.failure).collect();
        assert_eq!(failures.len(), 2, "{failures:?}");
        assert!(failures[0].contains("follow-ups 75.0%") && failures[0].contains("TTFT 1.13×"), "{failures:?}");
        assert!(failures[1].contains("p99 4.50 against 2.00"), "{failures:?}");
    }
}
