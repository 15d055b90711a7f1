//! `cargo xtask soak --minutes N`: a bounded soak of the gateway under churn.
//!
//! Mock engines and the gateway (dev profile) run for N minutes under mixed streaming and
//! non-streaming load while the pods file is rewritten every few seconds: a pod turns not
//! ready and back, or is replaced by a fresh engine (the old one stops once the gateway has
//! moved off it, as Kubernetes removes an endpoint before it kills the pod). The gateway's
//! resident memory (`VmRSS`) and open file descriptors are sampled from `/proc` all along.
//! After a warm-up the run fails if RSS grew by more than 10%, if the descriptor count kept
//! climbing, or if more than 1% of requests failed. A hostile mix runs alongside (see
//! [`hostile`]): large `auto` prompts, HTTP/2 bursts and a stream of new users, held to the
//! same failure bound.

mod hostile;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use testkit::PodSpec;

use crate::client::Client;
use crate::loadgen::{self, LoadReport, LoadSpec, Schedule};
use crate::procs;
use crate::stack::{self, Binaries, Engine, EngineSpec, GatewaySpec, Profile, Stack};
use crate::ui;

/// Model every soak engine serves.
const MODEL: &str = "soak-model";
/// Engines serving at any time.
const ENGINES: usize = 4;
/// Time between two pods-file rewrites.
const CHURN_EVERY: Duration = Duration::from_secs(5);
/// Time between two resource samples.
const SAMPLE_EVERY: Duration = Duration::from_secs(3);
/// How long a replaced engine keeps running after it left the pods file.
const RETIRE_AFTER: Duration = Duration::from_secs(3);
/// Largest RSS growth after warm-up, in percent.
const MAX_RSS_GROWTH_PERCENT: f64 = 10.0;
/// The model's config: a long-prompt profile that `config-profile: auto` picks for the
/// hostile mix's large prompts.
const MODEL_CONFIG: &str = r#"{"defaultProfile":"default","profiles":{"default":{"routingStrategy":"least-request"},"long":{"routingStrategy":"least-request","routingConfig":{"promptTokensGte":8192}}}}"#;
/// Per-user RPM limit (every hostile "new user" sends one request).
const DEFAULT_USER_RPM: &str = "600";
/// Largest share of failed requests, in percent.
const MAX_ERROR_PERCENT: f64 = 1.0;

/// Options of `cargo xtask soak`.
#[derive(Debug, Args)]
pub struct SoakArgs {
    /// Length of the run in minutes (the first third, at most 150 s, is warm-up).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=24 * 60))]
    pub minutes: u64,
}

/// One `/proc` sample of the gateway.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: u64,
}

/// Builds, starts the stack, soaks, and judges the samples.
pub fn run(args: &SoakArgs) -> Result<()> {
    let binaries = Binaries::build(Profile::Dev, "soak")?;
    stack::two_worker_runtime()?.block_on(soak(args, &binaries))
}

fn engine_spec(pod: String) -> EngineSpec {
    EngineSpec { pod, model: MODEL.into(), ttft_ms: 5, itl_ms: 3, tokens: 16, threads: None, extra_args: Vec::new() }
}

/// Writes the pods file: each engine a pod of [`MODEL`] with its readiness.
fn write_pods(path: &Path, engines: &[Engine], ready: &[bool]) -> Result<()> {
    let pods: Vec<PodSpec> = stack::engine_pods(engines)
        .into_iter()
        .zip(ready)
        .map(|(pod, ready)| pod.config(MODEL_CONFIG).ready(*ready))
        .collect();
    stack::write_pods(path, &pods)
}

/// `VmRSS` (KiB) and the number of open descriptors of process `pid`.
fn sample_process(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading /proc/PID/status")?;
    let rss_kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).context("listing /proc/PID/fd")?.count() as u64;
    Ok((rss_kib, fds))
}

async fn soak(args: &SoakArgs, binaries: &Binaries) -> Result<()> {
    let total = Duration::from_secs(args.minutes * 60);
    // Up to two and a half minutes: the hostile mix's stream of new users fills the per-user
    // counters until two minute-windows of users are held, then holds steady.
    let warmup = (total / 3).min(Duration::from_secs(150));
    let out_dir = procs::target_dir().join("soak");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let client = Client::new();
    let mut stack = Stack { engines: Vec::new(), gateway: None };
    let result = soak_with(&mut stack, binaries, &out_dir, &client, total, warmup).await;
    stack.stop().await?;
    result
}

async fn soak_with(
    stack: &mut Stack,
    binaries: &Binaries,
    out_dir: &Path,
    client: &Client,
    total: Duration,
    warmup: Duration,
) -> Result<()> {
    let step = ui::step(format!("soak: start {ENGINES} mock engines and the gateway"));
    let mut next_pod = 0usize;
    for _ in 0..ENGINES {
        let spec = engine_spec(format!("soak-{next_pod}"));
        next_pod += 1;
        stack.engines.push(stack::start_engine(&binaries.engine, &spec, out_dir, None).await?);
    }
    let mut ready = [true; ENGINES];
    let pods_file = out_dir.join("pods.yaml");
    write_pods(&pods_file, &stack.engines, &ready)?;
    let gateway = stack::start_gateway(
        GatewaySpec {
            routing_algorithm: Some("least-request"),
            env: vec![
                ("TURNSTILE_PODS_FILE_POLL_MS".into(), "100".into()),
                ("TURNSTILE_EBPF".into(), "off".into()),
                ("TURNSTILE_DEFAULT_USER_RPM".into(), DEFAULT_USER_RPM.into()),
            ],
            ..GatewaySpec::on_free_ports(&binaries.gateway, &pods_file, out_dir.join("gateway.log"))?
        },
        client,
    )
    .await?;
    let (listen, pid) = (gateway.listen, gateway.child.pid());
    stack.gateway = Some(gateway);
    stack::wait_models_listed(client, listen, &[MODEL], Duration::from_secs(10)).await?;
    ui::info(format!("gateway pid {pid} on {listen}; log {}", out_dir.join("gateway.log").display()));
    step.done();

    let step = ui::step(format!(
        "soak: {} of mixed load with pod churn every {} (warm-up {})",
        ui::human(total),
        ui::human(CHURN_EVERY),
        ui::human(warmup)
    ));
    let schedule = Schedule::starting_now(Duration::ZERO, total);
    let load = |stream: bool| {
        let spec = LoadSpec {
            targets: vec![listen],
            connections: 4,
            model: MODEL.into(),
            stream,
            max_tokens: 16,
            headers: Vec::new(),
        };
        tokio::spawn(async move { loadgen::run(&spec, schedule).await })
    };
    let (streaming, plain) = (load(true), load(false));
    let hostile_report = Arc::new(hostile::HostileReport::default());
    let hostile = tokio::spawn(hostile::run(listen, MODEL, Instant::now() + total, Arc::clone(&hostile_report)));

    let started = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut retiring: Vec<(Engine, Instant)> = Vec::new();
    let (mut next_sample, mut next_churn) = (started, started + CHURN_EVERY);
    let (mut toggles, mut replacements, mut round) = (0u32, 0u32, 0usize);
    while started.elapsed() < total {
        crate::stop::check()?;
        if let Some(exited) = stack.exited_child() {
            bail!("a child died during the soak: {exited}");
        }
        let now = Instant::now();
        if now >= next_sample {
            let (rss_kib, fds) = sample_process(pid)?;
            samples.push(Sample { at: started.elapsed(), rss_kib, fds });
            next_sample += SAMPLE_EVERY;
        }
        if now >= next_churn {
            round += 1;
            let index = round % ENGINES;
            if round % 2 == 1 {
                // Readiness flips: one pod out of rotation and back next time round.
                ready[index] = !ready[index];
                toggles += 1;
            } else {
                // Replacement: a fresh engine takes the slot; the old one stops a little later.
                let spec = engine_spec(format!("soak-{next_pod}"));
                next_pod += 1;
                let fresh = stack::start_engine(&binaries.engine, &spec, out_dir, None).await?;
                let old = std::mem::replace(&mut stack.engines[index], fresh);
                ready[index] = true;
                retiring.push((old, Instant::now() + RETIRE_AFTER));
                replacements += 1;
            }
            if ready.iter().all(|r| !r) {
                ready[0] = true;
            }
            write_pods(&pods_file, &stack.engines, &ready)?;
            next_churn += CHURN_EVERY;
        }
        let (due, waiting): (Vec<_>, Vec<_>) = retiring.into_iter().partition(|(_, at)| *at <= Instant::now());
        retiring = waiting;
        for (engine, _) in due {
            engine.child.stop(Duration::from_secs(5)).await?;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (engine, _) in retiring {
        engine.child.stop(Duration::from_secs(5)).await?;
    }
    let streaming = streaming.await.context("streaming load task")??;
    let plain = plain.await.context("non-streaming load task")??;
    hostile.await.context("hostile load task")?;
    step.done();

    let mut verdict = judge(&samples, warmup, &[("streaming", &streaming), ("non-streaming", &plain)]);
    judge_hostile(&hostile_report, &mut verdict);
    print_report(&samples, warmup, toggles, replacements, &[("streaming", &streaming), ("non-streaming", &plain)]);
    for line in &verdict.notes {
        ui::info(line);
    }
    if !verdict.failures.is_empty() {
        bail!("soak failed: {}", verdict.failures.join("; "));
    }
    println!("    soak passed");
    Ok(())
}

/// What the samples and load reports say.
struct Verdict {
    notes: Vec<String>,
    failures: Vec<String>,
}

fn mean(values: impl Iterator<Item = u64>) -> f64 {
    let (sum, count) = values.fold((0u64, 0u64), |(s, c), v| (s + v, c + 1));
    if count == 0 { 0.0 } else { sum as f64 / count as f64 }
}

/// Judges drift after `warmup`: the mean of the first three samples against the last three.
fn judge(samples: &[Sample], warmup: Duration, loads: &[(&str, &LoadReport)]) -> Verdict {
    let mut verdict = Verdict { notes: Vec::new(), failures: Vec::new() };
    let after: Vec<Sample> = samples.iter().copied().filter(|s| s.at >= warmup).collect();
    if after.len() < 6 {
        verdict.failures.push(format!("only {} samples after warm-up; run longer", after.len()));
        return verdict;
    }
    let (head, tail) = (&after[..3], &after[after.len() - 3..]);
    let rss_start = mean(head.iter().map(|s| s.rss_kib));
    let rss_end = mean(tail.iter().map(|s| s.rss_kib));
    let rss_growth = (rss_end - rss_start) / rss_start.max(1.0) * 100.0;
    verdict.notes.push(format!(
        "RSS after warm-up: {:.1} MiB -> {:.1} MiB ({rss_growth:+.1}%, limit +{MAX_RSS_GROWTH_PERCENT}%)",
        rss_start / 1024.0,
        rss_end / 1024.0
    ));
    if rss_growth > MAX_RSS_GROWTH_PERCENT {
        verdict.failures.push(format!("RSS grew {rss_growth:.1}% after warm-up"));
    }

    let fd_start = mean(head.iter().map(|s| s.fds));
    let fd_end = mean(tail.iter().map(|s| s.fds));
    let rising = after.windows(2).filter(|w| w[1].fds > w[0].fds).count();
    let falling = after.windows(2).filter(|w| w[1].fds < w[0].fds).count();
    verdict
        .notes
        .push(format!("open fds after warm-up: {fd_start:.0} -> {fd_end:.0} ({rising} samples up, {falling} down)"));
    // Connections come and go; a leak is growth that never gives back.
    let grew = fd_end - fd_start > (fd_start * 0.25).max(16.0);
    if grew && falling * 4 < rising {
        verdict.failures.push(format!("open fds grew steadily: {fd_start:.0} -> {fd_end:.0}"));
    }

    for (name, report) in loads {
        let total = report.completed + report.errors;
        let error_percent = report.errors as f64 / (total.max(1)) as f64 * 100.0;
        verdict.notes.push(format!(
            "{name}: {} ok, {} failed ({error_percent:.2}%), {:.0} req/s, p99 {:.1} ms",
            report.completed,
            report.errors,
            report.requests_per_second(),
            report.percentile_ms(99.0).unwrap_or(0.0)
        ));
        if total == 0 {
            verdict.failures.push(format!("{name}: no requests completed"));
        } else if error_percent > MAX_ERROR_PERCENT {
            verdict.failures.push(format!(
                "{name}: {error_percent:.2}% of requests failed (first: {})",
                report.first_error.as_deref().unwrap_or("?")
            ));
        }
    }
    verdict
}

/// The hostile mix: each kind sent and answered, and at most the same share failing.
fn judge_hostile(report: &hostile::HostileReport, verdict: &mut Verdict) {
    verdict.notes.extend(report.lines());
    let (ok, failed) = report.totals();
    let error_percent = failed as f64 / (ok + failed).max(1) as f64 * 100.0;
    if !report.each_kind_answered() {
        verdict.failures.push("hostile mix: a kind of hostile traffic was never answered".to_owned());
    } else if error_percent > MAX_ERROR_PERCENT {
        verdict.failures.push(format!("hostile mix: {error_percent:.2}% of requests failed"));
    }
}

fn print_report(samples: &[Sample], warmup: Duration, toggles: u32, replacements: u32, loads: &[(&str, &LoadReport)]) {
    println!("==> soak report");
    println!("    churn: {toggles} readiness flips, {replacements} pod replacements");
    println!("    {:>8}  {:>9}  {:>5}", "time", "RSS MiB", "fds");
    for sample in samples {
        let mark = if sample.at < warmup { " (warm-up)" } else { "" };
        println!(
            "    {:>7.0}s  {:>9.1}  {:>5}{mark}",
            sample.at.as_secs_f64(),
            sample.rss_kib as f64 / 1024.0,
            sample.fds
        );
    }
    let requests: u64 = loads.iter().map(|(_, r)| r.completed + r.errors).sum();
    println!("    {requests} requests in total");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(points: &[(u64, u64, u64)]) -> Vec<Sample> {
        points.iter().map(|&(at, rss_kib, fds)| Sample { at: Duration::from_secs(at), rss_kib, fds }).collect()
    }

    fn report(completed: u64, errors: u64) -> LoadReport {
        LoadReport {
            completed,
            errors,
            first_error: None,
            latencies_us: vec![1000; 3],
            measured: Duration::from_secs(60),
        }
    }

    #[test]
    fn flat_memory_and_fds_pass() {
        let s = samples(&[
            (0, 100, 10),
            (10, 30_000, 40),
            (20, 30_100, 42),
            (30, 30_050, 39),
            (40, 30_200, 41),
            (50, 30_100, 40),
            (60, 30_300, 42),
            (70, 30_200, 40),
        ]);
        let verdict = judge(&s, Duration::from_secs(10), &[("x", &report(100, 0))]);
        assert!(verdict.failures.is_empty(), "{:?}", verdict.failures);
    }

    #[test]
    fn growing_memory_fds_and_errors_fail() {
        let s = samples(&[
            (10, 30_000, 40),
            (20, 32_000, 60),
            (30, 34_000, 80),
            (40, 36_000, 100),
            (50, 38_000, 120),
            (60, 40_000, 140),
        ]);
        let verdict = judge(&s, Duration::from_secs(10), &[("x", &report(90, 10))]);
        assert_eq!(verdict.failures.len(), 3, "{:?}", verdict.failures);
    }

    #[test]
    fn reads_this_process() {
        let (rss, fds) = sample_process(std::process::id()).expect("own /proc entry");
        assert!(rss > 0 && fds > 0);
    }
}
