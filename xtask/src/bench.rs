//! `cargo xtask bench [SUITE]`: performance measurements written to `target/bench/`.
//!
//! `core` (the default) measures what the gateway costs on the request path: the same load
//! sent straight to two mock engines (client-side round robin) and through the gateway, in one
//! run, non-streaming and streaming. The numbers to watch are the ratios gateway/direct and the
//! gateway's CPU time per request (compare with `shared/notes/peer-benchmark.md`).
//!
//! `routing` compares the placement quality of every routing strategy against `random` on
//! mock engines whose time to first token depends on load and prefix reuse (see `routing.rs`).
//!
//! `kernel` measures what a penalised client's connection flood costs the gateway with kernel
//! assist and userspace-only, in one run (root; see `kernel.rs`).
//!
//! `peers` runs the same engines and load against nginx, Envoy, the vLLM router, the SGLang
//! router and Turnstile in one run: added latency over direct, CPU per request, peak RSS
//! (see `peers.rs`).
//!
//! `users` measures per-user RPM counting as distinct users pile up: one user, then a new
//! user per request after 100k and 1M users (see `users.rs`).
//!
//! `fleet` measures what engine scraping and routing cost as the fleet grows: 2 to 1,000 pods
//! served by one nginx on many loopback ports, with 1 and 4 gateway replicas (sharing a Redis);
//! per size, the gateway's idle CPU, the scrapes each engine receives, the metrics age p99, and
//! CPU per request and latency under load, next to nginx as the proxy in the gateway's place
//! (see `fleet.rs`).
//!
//! `tracing` measures what OpenTelemetry tracing costs the gateway per request: direct, then
//! fresh gateways with tracing off and exporting at sampling ratios 1.0 and 0.01 to an OTLP/HTTP
//! sink in this process; CPU per request against tracing off, spans exported and dropped, and
//! what the sink received (see `tracing.rs`).

mod fleet;
mod kernel;
mod peers;
mod profile;
mod replicas;
mod routing;
mod tracing;
mod users;

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};

use crate::client::Client;
use crate::loadgen::{self, LoadReport, LoadSpec, Schedule};
use crate::procs;
use crate::setup::{self, Strictness};
use crate::stack::{self, Binaries, EngineSpec, GatewaySpec, Profile, Stack};
use crate::stop;
use crate::ui;

/// Which benchmark suite to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// Gateway overhead vs direct-to-engine, non-stream and stream.
    Core,
    /// Routing quality of every strategy against random: TTFT, load spread, prefix reuse.
    Routing,
    /// Kernel assist on vs off: gateway CPU per refused connection under a flood (root).
    Kernel,
    /// Turnstile next to nginx, Envoy, the vLLM and SGLang routers on the same engines and load.
    Peers,
    /// Per-user RPM counting: one user, then a new user per request after 100k and 1M users.
    Users,
    /// Engine scraping and routing cost as the fleet grows: 2 to 1,000 pods, 1 and 4 replicas.
    Fleet,
    /// Routing as one brain across 1, 2 and 4 replicas sharing Redis: prefix affinity, load spread, TTFT.
    Replicas,
    /// OpenTelemetry tracing off vs on (sampling 1.0 and 0.01): gateway CPU per request, spans exported.
    Tracing,
}

/// Options of `cargo xtask bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Suite to run.
    #[arg(value_enum, default_value = "core")]
    pub suite: Suite,
    /// Concurrent keep-alive connections of the load generator.
    #[arg(long, visible_alias = "concurrency", default_value_t = 32)]
    pub connections: usize,
    /// Measured period of each run, seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Warm-up before each measured period, seconds.
    #[arg(long, default_value_t = 2)]
    pub warmup_seconds: u64,
    /// Core suite: record each gateway row with `perf record` and draw its flame graph into
    /// `docs/bench/` (root; `perf` installed), with the samples split by part of the gateway.
    #[arg(long)]
    pub perf: bool,
    /// Extra environment of the gateway under test (`KEY=VALUE`, repeatable; core and tracing suites),
    /// to measure what a setting costs: `--gateway-env TURNSTILE_AIBRIX_METRIC_NAMES=false`.
    #[arg(long = "gateway-env", value_name = "KEY=VALUE", value_parser = key_value)]
    pub gateway_env: Vec<(String, String)>,
    /// Options of the peers suite.
    #[command(flatten)]
    pub peers: peers::PeerArgs,
    /// Options of the fleet suite.
    #[command(flatten)]
    pub fleet: fleet::FleetArgs,
}

const MODEL: &str = "bench-model";
/// Tokens per answer; the engines add no delay, so this is pure proxying work.
const TOKENS: u32 = 16;

/// A `KEY=VALUE` pair.
fn key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

/// Runs the chosen suite.
pub fn run(args: &BenchArgs) -> Result<()> {
    match args.suite {
        Suite::Core => run_core(args),
        Suite::Routing => routing::run(),
        Suite::Kernel => kernel::run(args),
        Suite::Peers => peers::run(args),
        Suite::Users => users::run(args.connections),
        Suite::Fleet => fleet::run(args),
        Suite::Replicas => replicas::run(),
        Suite::Tracing => tracing::run(args),
    }
}

/// Where each process runs: with two or more CPUs and taskset, the gateway gets CPU 0 alone
/// and the engines plus the load generator share CPU 1, so the gateway's numbers are its own.
#[derive(Debug, Clone, Copy)]
struct Pinning {
    gateway: Option<usize>,
    others: Option<usize>,
    /// CPUs available before pinning (pinning xtask itself hides the others from it).
    cpus: usize,
}

impl Pinning {
    /// How the run was pinned, for a report: `{pinned} pinned to CPU 0, {others} to CPU 1`.
    fn describe(self, pinned: &str, others: &str) -> String {
        match (self.gateway, self.others) {
            (Some(cpu), Some(other_cpu)) => format!("{pinned} pinned to CPU {cpu}, {others} to CPU {other_cpu}"),
            _ => "no CPU pinning".into(),
        }
    }
}

/// Chooses where each process runs, pins this process (the load generator) accordingly, and
/// says so: `pinned` names what gets CPU 0 alone, `others` what shares CPU 1 with us.
fn pin_for_run(pinned: &str, others: &str) -> Result<Pinning> {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus < 2 || procs::find_program("taskset").is_none() {
        ui::info("pinning: none (needs taskset and two CPUs); numbers are noisier");
        return Ok(Pinning { gateway: None, others: None, cpus });
    }
    let pinning = Pinning { gateway: Some(0), others: Some(1), cpus };
    // Before the runtime starts, so every runtime thread (and child) inherits it.
    let pid = std::process::id().to_string();
    procs::capture(std::process::Command::new("taskset").args(["-a", "-p", "-c", "1", &pid]), Duration::from_secs(10))
        .context("pinning the load generator with taskset")?;
    ui::info(format!("pinning: {} (taskset)", pinning.describe(pinned, others)));
    Ok(pinning)
}

/// Runs a suite's measurements on one thread until they end or a stop signal arrives; the
/// stop drops the run, and with it the stack, whose guards kill the children.
fn block_on_until_stopped(work: impl Future<Output = Result<()>>) -> Result<()> {
    // One thread: the load generator shares its CPU with the engines, and a single-threaded
    // runtime wastes none of it on work stealing.
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the tokio runtime")?;
    runtime.block_on(async {
        tokio::select! {
            result = work => result,
            name = stop::requested_async() => Err(anyhow!("interrupted by {name}")),
        }
    })
}

/// Creates `target/bench` (where every suite writes its logs and reports) and returns it.
fn bench_dir() -> Result<std::path::PathBuf> {
    let out_dir = procs::target_dir().join("bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    Ok(out_dir)
}

/// Writes a suite's report to `target/bench/<file>` and prints it.
fn publish_report(out_dir: &std::path::Path, file: &str, markdown: &str) -> Result<()> {
    let path = out_dir.join(file);
    std::fs::write(&path, markdown).with_context(|| format!("writing {}", path.display()))?;
    println!("\n{markdown}");
    ui::info(format!("written to {}", path.display()));
    Ok(())
}

/// Starts the release gateway on free loopback ports (least-request, its default logging) with
/// `env` added, pinned as `pinning` says; also returns its RUST_LOG.
async fn start_release_gateway(
    binaries: &Binaries,
    pods_file: &std::path::Path,
    log: std::path::PathBuf,
    mut env: Vec<(String, String)>,
    pinning: Pinning,
    client: &Client,
) -> Result<(stack::Gateway, String)> {
    // The gateway's default: info, an access line per request (text, to the log file, about
    // 100 MB per row at 25,000 requests/s), as operators run it; RUST_LOG from the caller wins.
    let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    env.push(("RUST_LOG".into(), rust_log.clone()));
    let gateway = stack::start_gateway(
        GatewaySpec {
            routing_algorithm: Some("least-request"),
            env,
            cpu: pinning.gateway,
            ..GatewaySpec::on_free_ports(&binaries.gateway, pods_file, log)?
        },
        client,
    )
    .await?;
    Ok((gateway, rust_log))
}

/// A mock engine of [`MODEL`] that answers `tokens` tokens at once (no TTFT, no ITL), so
/// the time goes to what is measured.
fn instant_engine(pod: String, tokens: u32, pinning: Pinning) -> EngineSpec {
    EngineSpec {
        pod,
        model: MODEL.into(),
        ttft_ms: 0,
        itl_ms: 0,
        tokens,
        // The engines share one CPU with the load generator; more threads only contend.
        threads: pinning.others.map(|_| 1),
        extra_args: Vec::new(),
    }
}

/// Starts two instant engines of [`MODEL`] (`engine-0`, `engine-1`, pinned as `pinning` says)
/// and writes their pods file at `pods_file`.
async fn start_instant_engines(
    binaries: &Binaries,
    out_dir: &std::path::Path,
    pods_file: &std::path::Path,
    pinning: Pinning,
) -> Result<Stack> {
    let mut stack = Stack { engines: Vec::new(), gateway: None };
    for index in 0..2 {
        let spec = instant_engine(format!("engine-{index}"), TOKENS, pinning);
        let engine = stack::start_engine(&binaries.engine, &spec, out_dir, pinning.others).await?;
        ui::info(format!("{} on {}", engine.pod, engine.addr));
        stack.engines.push(engine);
    }
    write_engine_pods(&stack.engines, pods_file)?;
    Ok(stack)
}

/// Where `--perf` flame graphs go: `docs/bench/` of the repository, committed.
fn profile_dir() -> Result<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Writes a pods file at `path` listing `engines`, each a ready pod of its model.
fn write_engine_pods(engines: &[stack::Engine], path: &std::path::Path) -> Result<()> {
    stack::write_pods(path, &stack::engine_pods(engines))
}

fn run_core(args: &BenchArgs) -> Result<()> {
    if args.connections == 0 || args.seconds == 0 {
        bail!("--connections and --seconds must be at least 1");
    }
    setup::run(Strictness::Lenient)?;
    let binaries = Binaries::build(Profile::Release, "bench")?;
    let pinning = pin_for_run("gateway", "engines and load generator")?;
    block_on_until_stopped(core_async(args, &binaries, pinning))
}

/// One measured run: a scenario against a target.
struct Row {
    scenario: &'static str,
    target: &'static str,
    report: LoadReport,
    /// Gateway CPU per successful request, microseconds (gateway target only).
    gateway_cpu_us: Option<f64>,
}

async fn core_async(args: &BenchArgs, binaries: &Binaries, pinning: Pinning) -> Result<()> {
    let out_dir = bench_dir()?;
    let client = Client::new();

    let step = ui::step("bench: start 2 mock engines and the gateway (release)");
    let pods_file = out_dir.join("pods.yaml");
    let mut stack = start_instant_engines(binaries, &out_dir, &pods_file, pinning).await?;
    let env = args.gateway_env.clone();
    let (gateway, rust_log) =
        start_release_gateway(binaries, &pods_file, out_dir.join("gateway.log"), env, pinning, &client).await?;
    ui::info(format!("gateway on {} (admin {}), least-request, RUST_LOG={rust_log}", gateway.listen, gateway.admin));
    for (key, value) in &args.gateway_env {
        ui::info(format!("gateway environment: {key}={value}"));
    }
    let gateway_addr = gateway.listen;
    let gateway_pid = gateway.child.pid();
    stack.gateway = Some(gateway);
    stack::wait_models_listed(&client, gateway_addr, &[MODEL], Duration::from_secs(10)).await?;
    step.done();

    let engine_addrs: Vec<_> = stack.engines.iter().map(|engine| engine.addr).collect();
    let mut rows = Vec::new();
    let mut profiles = Vec::new();
    for (scenario, stream) in [("chat", false), ("chat stream", true)] {
        for (target, targets) in [("direct", engine_addrs.clone()), ("gateway", vec![gateway_addr])] {
            let step = ui::step(format!(
                "bench: {scenario} → {target}: {} connections, {} s warm-up + {} s",
                args.connections, args.warmup_seconds, args.seconds
            ));
            let spec = LoadSpec {
                targets,
                connections: args.connections,
                model: MODEL.into(),
                stream,
                max_tokens: TOKENS,
                headers: Vec::new(),
            };
            let schedule =
                Schedule::starting_now(Duration::from_secs(args.warmup_seconds), Duration::from_secs(args.seconds));
            let sample_pid = (target == "gateway").then_some(gateway_pid);
            let perf_data = out_dir.join(format!("perf-{}.data", scenario.replace(' ', "-")));
            let record = async {
                match sample_pid {
                    Some(pid) if args.perf => profile::record(pid, schedule, &perf_data).await.map(Some),
                    _ => Ok(None),
                }
            };
            let (report, cpu, recorded) =
                tokio::join!(loadgen::run(&spec, schedule), cpu_over(sample_pid, schedule), record);
            let report = report?;
            let gateway_cpu_us = cpu?.map(|cpu| per_request_us(cpu, &report));
            if let Some(reason) = stack.exited_child() {
                bail!("a child died during the run: {reason}");
            }
            ui::info(summarize(&report));
            if let (Some(()), Some(cpu_us)) = (recorded?, gateway_cpu_us) {
                let svg = profile_dir()?.join(format!("core-{}.svg", scenario.replace(' ', "-")));
                let title = format!("turnstile {} — {scenario}, {cpu_us:.1} µs/request", revision());
                let shares = profile::render(&perf_data, &svg, &title)?;
                ui::info(format!("flame graph: {}", svg.display()));
                profiles.push(format!(
                    "\n### Where the gateway's CPU goes: {scenario}\n\n{}\nFlame graph: `docs/bench/{}`.\n",
                    profile::table(&shares, cpu_us),
                    svg.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
                ));
            }
            rows.push(Row { scenario, target, report, gateway_cpu_us });
            step.done();
        }
    }
    stack.stop().await?;

    let mut report = render_markdown(args, pinning, &revision(), &rows);
    report.extend(profiles);
    publish_report(&out_dir, "core.md", &report)?;
    let failed: u64 = rows.iter().map(|row| row.report.errors).sum();
    let empty = rows.iter().any(|row| row.report.completed == 0);
    if empty {
        bail!("a run completed no request; see the logs in {}", out_dir.display());
    }
    if failed > 0 {
        ui::warn(format!("{failed} requests failed; see the errors column"));
    }
    Ok(())
}

/// CPU time `pid` used during the measured period of `schedule` (None without a pid).
async fn cpu_over(pid: Option<u32>, schedule: Schedule) -> Result<Option<Duration>> {
    cpu_during(pid, schedule, procs::process_cpu_time).await
}

/// The growth of `cpu_time(pid)` over the measured period of `schedule` (None without a pid).
async fn cpu_during(
    pid: Option<u32>,
    schedule: Schedule,
    cpu_time: impl Fn(u32) -> Result<Duration>,
) -> Result<Option<Duration>> {
    let Some(pid) = pid else {
        return Ok(None);
    };
    tokio::time::sleep_until(schedule.measure_start.into()).await;
    let before = cpu_time(pid)?;
    tokio::time::sleep_until(schedule.measure_end.into()).await;
    let after = cpu_time(pid)?;
    Ok(Some(after.saturating_sub(before)))
}

/// The measured source tree, `git describe --always --dirty`, so a saved report says what it
/// measured.
fn revision() -> String {
    procs::capture(&mut procs::git_command(["describe", "--always", "--dirty"]), Duration::from_secs(10))
        .ok()
        .filter(|out| out.status.success())
        .map(|out| out.stdout.trim().to_owned())
        .filter(|revision| !revision.is_empty())
        .unwrap_or_else(|| "unknown revision".into())
}

/// A run's throughput, median and tail latency and errors (with the first one), for a line of
/// progress.
fn summarize(report: &LoadReport) -> String {
    format!(
        "{:.0} req/s, p50 {} ms, p99 {} ms, {} errors{}",
        report.requests_per_second(),
        format_ms(report.percentile_ms(50.0)),
        format_ms(report.percentile_ms(99.0)),
        report.errors,
        report.first_error.as_deref().map(|err| format!(" (first: {err})")).unwrap_or_default()
    )
}

/// `cpu` spread over the run's completed requests, microseconds.
fn per_request_us(cpu: Duration, report: &LoadReport) -> f64 {
    cpu.as_secs_f64() * 1e6 / report.completed.max(1) as f64
}

fn format_ms(ms: Option<f64>) -> String {
    ms.map_or_else(|| "-".into(), |ms| format!("{ms:.2}"))
}

fn ratio(numerator: Option<f64>, denominator: Option<f64>) -> String {
    match (numerator, denominator) {
        (Some(n), Some(d)) if d > 0.0 => format!("{:.2}", n / d),
        _ => "-".into(),
    }
}

/// The load of a suite's runs, as its report opens with it.
fn describe_load(args: &BenchArgs) -> String {
    format!(
        "POST /v1/chat/completions, {} keep-alive HTTP/1.1 connections, {} s warm-up + {} s measured per row",
        args.connections, args.warmup_seconds, args.seconds
    )
}

/// The report: one row per run, then the gateway/direct ratios per scenario.
fn render_markdown(args: &BenchArgs, pinning: Pinning, revision: &str, rows: &[Row]) -> String {
    let mut out = format!("# Turnstile core benchmark ({revision})\n\n");
    let pinned = pinning.describe("gateway", "engines and load generator");
    let _ = writeln!(
        out,
        "{}, 2 mock engines (ttft 0, itl 0, {TOKENS} tokens), gateway with least-request; {pinned}; {} CPUs.\n",
        describe_load(args),
        pinning.cpus,
    );
    out.push_str(
        "| scenario | target | req/s | p50 ms | p90 ms | p99 ms | errors | gateway CPU µs/request |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for Row { scenario, target, report, gateway_cpu_us } in rows {
        let _ = writeln!(
            out,
            "| {scenario} | {target} | {:.0} | {} | {} | {} | {} | {} |",
            report.requests_per_second(),
            format_ms(report.percentile_ms(50.0)),
            format_ms(report.percentile_ms(90.0)),
            format_ms(report.percentile_ms(99.0)),
            report.errors,
            gateway_cpu_us.map_or_else(|| "–".into(), |us| format!("{us:.1}")),
        );
    }
    out.push_str(
        "\n| scenario | req/s gateway/direct | p50 gateway/direct | p99 gateway/direct |\n\
         |---|---:|---:|---:|\n",
    );
    let mut scenarios: Vec<&str> = rows.iter().map(|row| row.scenario).collect();
    scenarios.dedup();
    for scenario in scenarios {
        let find = |target: &str| {
            rows.iter().find(|row| row.scenario == scenario && row.target == target).map(|row| &row.report)
        };
        let (Some(direct), Some(gateway)) = (find("direct"), find("gateway")) else {
            continue;
        };
        let _ = writeln!(
            out,
            "| {scenario} | {} | {} | {} |",
            ratio(Some(gateway.requests_per_second()), Some(direct.requests_per_second())),
            ratio(gateway.percentile_ms(50.0), direct.percentile_ms(50.0)),
            ratio(gateway.percentile_ms(99.0), direct.percentile_ms(99.0)),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(completed: u64, latencies_us: Vec<u32>) -> LoadReport {
        LoadReport { completed, errors: 0, first_error: None, latencies_us, measured: Duration::from_secs(10) }
    }

    #[test]
    fn markdown_has_rows_and_ratios() {
        let args = BenchArgs {
            gateway_env: Vec::new(),
            perf: false,
            suite: Suite::Core,
            connections: 32,
            seconds: 10,
            warmup_seconds: 2,
            peers: peers::PeerArgs::default(),
            fleet: fleet::FleetArgs::default(),
        };
        let rows = vec![
            Row {
                scenario: "chat",
                target: "direct",
                report: report(100_000, vec![1000, 1000, 2000]),
                gateway_cpu_us: None,
            },
            Row {
                scenario: "chat",
                target: "gateway",
                report: report(50_000, vec![2000, 2000, 4000]),
                gateway_cpu_us: Some(21.5),
            },
        ];
        let pinning = Pinning { gateway: Some(0), others: Some(1), cpus: 2 };
        let markdown = render_markdown(&args, pinning, "abc1234", &rows);
        assert!(markdown.contains("| chat | direct | 10000 | 1.00 | 2.00 | 2.00 | 0 | – |"));
        assert!(markdown.contains("| chat | gateway | 5000 | 2.00 | 4.00 | 4.00 | 0 | 21.5 |"));
        assert!(markdown.contains("| chat | 0.50 | 2.00 | 2.00 |"));
        assert!(markdown.contains("gateway pinned to CPU 0"));
        assert!(markdown.contains("; 2 CPUs"));
        assert!(markdown.starts_with("# Turnstile core benchmark (abc1234)"));
    }
}
