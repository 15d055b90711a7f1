//! `cargo xtask bench kernel`: what a penalised client's connection flood costs the gateway,
//! with kernel assist (the `sk_lookup` program refuses the connections) and without (the
//! gateway accepts each one and closes it at once), in one run.
//!
//! Everything runs inside a network namespace of its own (root needed): one mock engine
//! serving two models (one capped at 1 request per second), and the gateway, once with
//! `--ebpf required` and once with `--ebpf off`. For each mode:
//!
//! 1. the client 127.0.0.2 earns a penalty the ordinary way (three 429s on the capped model);
//! 2. normal clients (127.0.0.1, keep-alive) send requests alone, then while the penalised
//!    client opens connections in a loop on its own thread (back to back up to a fixed pace
//!    and count): their p50/p99 in both periods;
//! 3. the gateway's CPU time over an idle period, then during the flood alone.
//!
//! Gateway CPU time per refused connection = (CPU during the flood alone − CPU while idle) /
//! connections the gateway counted as refused. CPU time comes from /proc in clock ticks, so
//! a cost below a tick or two over the period is reported with that resolution.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    BenchArgs, MODEL, Pinning, TOKENS, bench_dir, block_on_until_stopped, cpu_over, format_ms, instant_engine,
    pin_for_run, publish_report, revision, summarize,
};
use crate::client::Client;
use crate::loadgen::{self, LoadReport, LoadSpec, Schedule};
use testkit::PodSpec;
use testkit::netns::{Entered, NetNs};

use crate::setup::{self, Strictness};
use crate::stack::{self, Binaries, EngineSpec, Profile, Stack};
use crate::{stop, ui};

/// The model the penalised client earns its 429s on.
const CAPPED_MODEL: &str = "bench-capped";
/// The penalised client's source address, on the namespace's loopback.
const FLOODER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// Keep-alive connections of the normal clients: few enough that the gateway has CPU to
/// spare, so its CPU time is work done rather than time waiting for a core.
const NORMAL_CONNECTIONS: usize = 4;
/// The flood's pace: the same offered load in both modes, so the normal clients' latencies
/// compare (an unpaced loop runs 25 times faster against kernel assist, and on two CPUs
/// then mostly measures the clients' own CPU starving).
const FLOOD_PER_SECOND: u64 = 10_000;
/// Upper bound on the flood's connection attempts in one period.
const MAX_FLOOD_ATTEMPTS: u64 = 2_000_000;
/// A flood connect that takes longer is abandoned (a full accept queue drops SYNs).
const FLOOD_CONNECT_TIMEOUT: Duration = Duration::from_millis(50);

/// Gateway settings of one mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Kernel,
    Userspace,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Self::Kernel => "kernel assist",
            Self::Userspace => "userspace only",
        }
    }

    /// The `hook` label of the refused-connections counter in this mode.
    fn hook(self) -> &'static str {
        match self {
            Self::Kernel => "sk_lookup",
            Self::Userspace => "userspace",
        }
    }
}

/// Results of one mode.
struct ModeResult {
    mode: Mode,
    /// Normal clients alone.
    baseline: LoadReport,
    /// Normal clients during the flood.
    flood: LoadReport,
    /// Gateway CPU with no traffic at all.
    idle_cpu: Duration,
    /// Gateway CPU during the flood alone.
    flood_only_cpu: Duration,
    /// Connections the gateway counted as refused during the flood alone.
    refused: u64,
    /// Connection attempts the flooder made during the flood alone.
    attempts: u64,
}

impl ModeResult {
    /// Gateway CPU per refused connection, µs (clamped at 0), and the resolution of that
    /// figure: the two readings' clock ticks spread over the refused connections.
    fn cpu_per_refused_us(&self) -> (f64, f64) {
        let extra_us = (self.flood_only_cpu.as_secs_f64() - self.idle_cpu.as_secs_f64()) * 1e6;
        let refused = self.refused.max(1) as f64;
        let tick_us = 1e6 / rustix::param::clock_ticks_per_second().max(1) as f64;
        ((extra_us / refused).max(0.0), 2.0 * tick_us / refused)
    }
}

/// Runs the suite.
pub fn run(args: &BenchArgs) -> Result<()> {
    if args.seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    if !rustix::process::geteuid().is_root() {
        bail!("bench kernel needs root: it loads eBPF programs and creates a network namespace");
    }
    setup::run(Strictness::Lenient)?;
    let binaries = Binaries::build(Profile::Release, "bench kernel")?;
    let pinning = pin_for_run("gateway", "engine, clients and flooder")?;
    let _namespace = enter_bench_namespace()?;
    block_on_until_stopped(kernel_async(args, &binaries, pinning))
}

async fn kernel_async(args: &BenchArgs, binaries: &Binaries, pinning: Pinning) -> Result<()> {
    let out_dir = bench_dir()?;
    let client = Client::new();

    let spec = EngineSpec {
        extra_args: vec!["--model".into(), CAPPED_MODEL.into()],
        ..instant_engine("engine-0".into(), TOKENS, pinning)
    };
    let engine = stack::start_engine(&binaries.engine, &spec, &out_dir, pinning.others).await?;
    let capped = serde_json::json!({"defaultProfile": "default",
        "profiles": {"default": {"routingStrategy": "least-request", "requestsPerSecond": 1}}});
    let pods = [
        PodSpec::for_engine(&engine, MODEL),
        PodSpec::new("engine-0-capped", CAPPED_MODEL, engine.addr.port()).config(&capped.to_string()),
    ];
    let pods_file = out_dir.join("kernel-pods.yaml");
    stack::write_pods(&pods_file, &pods)?;
    let mut stack = Stack { engines: vec![engine], gateway: None };

    let mut results = Vec::new();
    for mode in [Mode::Kernel, Mode::Userspace] {
        stop::check()?;
        let result = run_mode(args, binaries, pinning, &client, &pods_file, &out_dir, mode, &mut stack).await;
        if let Some(gateway) = stack.gateway.take() {
            gateway.child.stop(Duration::from_secs(5)).await?;
        }
        results.push(result?);
    }
    stack.stop().await?;

    publish_report(&out_dir, "kernel.md", &render_markdown(args, pinning, &revision(), &results))?;
    if let Some(failure) = acceptance(&results).failure {
        bail!("kernel bench acceptance failed: {failure}");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_mode(
    args: &BenchArgs,
    binaries: &Binaries,
    pinning: Pinning,
    client: &Client,
    pods_file: &Path,
    out_dir: &Path,
    mode: Mode,
    stack: &mut Stack,
) -> Result<ModeResult> {
    let step = ui::step(format!("bench: gateway with {}", mode.label()));
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/turnstile-bench-{}", std::process::id()));
    let ebpf = match mode {
        Mode::Kernel => "required",
        Mode::Userspace => "off",
    };
    let env = [
        ("TURNSTILE_EBPF", ebpf),
        ("TURNSTILE_BPFFS_DIR", pin_dir.to_str().unwrap_or_default()),
        ("TURNSTILE_PENALTY_THRESHOLD", "3"),
        ("TURNSTILE_PENALTY_WINDOW_SECONDS", "60"),
        ("TURNSTILE_PENALTY_SECONDS", "3600"),
    ];
    let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    let log = out_dir.join(format!("gateway-{ebpf}.log"));
    let (gateway, _) = super::start_release_gateway(binaries, pods_file, log, env, pinning, client).await?;
    let (listen, admin) = (gateway.listen, gateway.admin);
    let pid = gateway.child.pid();
    stack.gateway = Some(gateway);
    stack::wait_models_listed(client, listen, &[MODEL, CAPPED_MODEL], Duration::from_secs(10)).await?;
    let active = client.get(admin, "/readyz", Duration::from_secs(2)).await?.text();
    ui::info(format!("readyz: {active}"));

    penalise(listen).await?;
    let (result, took) = probe(listen).await;
    ui::info(format!("a penalised connect now: {result} after {took:?}"));

    let spec = LoadSpec {
        targets: vec![listen],
        connections: NORMAL_CONNECTIONS,
        model: MODEL.into(),
        stream: false,
        max_tokens: TOKENS,
        headers: Vec::new(),
    };
    let period = |warmup| Schedule::starting_now(Duration::from_secs(warmup), Duration::from_secs(args.seconds));

    let schedule = period(args.warmup_seconds);
    let baseline = loadgen::run(&spec, schedule).await?;
    ui::info(format!("baseline: {}", summarize(&baseline)));

    let schedule = period(1);
    let flood = Flood::start(listen, schedule);
    let report = loadgen::run(&spec, schedule).await;
    let flood_attempts = flood.finish()?;
    let flood_report = report?;
    ui::info(format!("normal clients during the flood ({flood_attempts} attempts): {}", summarize(&flood_report)));

    // The flood's own cost: the gateway's CPU with the flood alone, against an idle period.
    let schedule = period(1);
    let idle_cpu = cpu_over(Some(pid), schedule).await?.unwrap_or_default();
    let schedule = period(1);
    let refused_before = refused_count(client, admin, mode).await?;
    let flood = Flood::start(listen, schedule);
    let flood_only_cpu = cpu_over(Some(pid), schedule).await?.unwrap_or_default();
    let attempts = flood.finish()?;
    let refused = refused_count(client, admin, mode).await?.saturating_sub(refused_before);
    if let Some(reason) = stack.exited_child() {
        bail!("a child died during the run: {reason}");
    }
    let result = ModeResult { mode, baseline, flood: flood_report, idle_cpu, flood_only_cpu, refused, attempts };
    let (per_refused, resolution) = result.cpu_per_refused_us();
    ui::info(format!(
        "flood alone: {attempts} attempts, {refused} refused by the gateway, gateway CPU {:?} (idle {:?}): \
         {per_refused:.2} µs per refused connection (±{resolution:.2})",
        flood_only_cpu, idle_cpu
    ));
    let _ = std::fs::remove_dir_all(&pin_dir);
    step.done();
    Ok(result)
}

/// A network namespace of the benchmark's own, with the flooder's address on its loopback,
/// entered by this thread (and so every thread and child it starts from now on) until the
/// guards drop; also used by `peers`.
pub(super) fn enter_bench_namespace() -> Result<(Entered, NetNs)> {
    let namespace = NetNs::create("bench").context("creating a network namespace")?;
    namespace.add_loopback_address("127.0.0.2/8").context("adding the flooder's address")?;
    let entered = namespace.enter().context("entering the network namespace")?;
    Ok((entered, namespace))
}

/// Earns the flooder its penalty: requests on the capped model until three 429s.
async fn penalise(proxy: SocketAddr) -> Result<()> {
    let mut rate_limited = 0;
    for _ in 0..50 {
        if one_request(proxy, CAPPED_MODEL).await? == 429 {
            rate_limited += 1;
            if rate_limited == 3 {
                return Ok(());
            }
        }
    }
    bail!("{FLOODER} never got three 429s on {CAPPED_MODEL}")
}

/// One `Connection: close` request from the flooder's address; the status.
async fn one_request(proxy: SocketAddr, model: &str) -> Result<u16> {
    let work = async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(FLOODER, 0))?;
        let mut stream = socket.connect(proxy).await?;
        let body = serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}).to_string();
        let request = testkit::http1::post_json_closing(proxy, "/v1/chat/completions", &body);
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), work).await.context("request timed out")??;
    testkit::http1::response_status(&response).ok_or_else(|| anyhow!("no HTTP response"))
}

/// One connection attempt from the flooder: how it ended and how long it took.
async fn probe(proxy: SocketAddr) -> (String, Duration) {
    let started = Instant::now();
    let outcome = match flood_connect(proxy).await {
        Ok(()) => "connected (closed by the gateway)".to_owned(),
        Err(err) => err.to_string(),
    };
    (outcome, started.elapsed())
}

async fn flood_connect(proxy: SocketAddr) -> std::io::Result<()> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    // No TIME_WAIT left behind: tens of thousands of attempts would exhaust the ports.
    socket.set_zero_linger()?;
    socket.bind(SocketAddr::new(FLOODER, 0))?;
    match tokio::time::timeout(FLOOD_CONNECT_TIMEOUT, socket.connect(proxy)).await {
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(err)) => Err(err),
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")),
    }
}

/// The penalised client's connection loop, on its own thread (and so its own runtime, so
/// it never starves the normal clients' runtime of polls).
struct Flood {
    thread: std::thread::JoinHandle<()>,
    attempts: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Flood {
    fn start(proxy: SocketAddr, schedule: Schedule) -> Self {
        let attempts = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (counter, stopped) = (Arc::clone(&attempts), Arc::clone(&stop));
        // A new thread starts in the network namespace of the thread creating it.
        let thread = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async {
                tokio::time::sleep_until(schedule.measure_start.into()).await;
                let started = Instant::now();
                while Instant::now() < schedule.measure_end
                    && !stopped.load(Ordering::Relaxed)
                    && counter.load(Ordering::Relaxed) < MAX_FLOOD_ATTEMPTS
                {
                    // Back to back while behind the pace, else wait for the next millisecond.
                    let due = started.elapsed().as_micros() as u64 * FLOOD_PER_SECOND / 1_000_000;
                    if counter.load(Ordering::Relaxed) >= due {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    let _ = flood_connect(proxy).await;
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            });
        });
        Self { thread, attempts, stop }
    }

    /// Waits for the loop to end (it ends with the period); the attempts it made.
    fn finish(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| anyhow!("the flood thread panicked"))?;
        Ok(self.attempts.load(Ordering::Relaxed))
    }
}

/// The gateway's refused-connections counter for this mode's hook.
async fn refused_count(client: &Client, admin: SocketAddr, mode: Mode) -> Result<u64> {
    let text = client.get(admin, "/metrics", Duration::from_secs(5)).await?.text();
    let prefix = format!("aibrix_gateway_kernel_refused_connections_total{{hook=\"{}\"}} ", mode.hook());
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map(|value| value as u64)
        .ok_or_else(|| anyhow!("no {prefix}series in /metrics"))
}

/// The acceptance check: refused connections cost the gateway at least 5× less CPU with
/// kernel assist.
struct Acceptance {
    ratio_at_least: f64,
    failure: Option<String>,
}

const REQUIRED_RATIO: f64 = 5.0;

fn acceptance(results: &[ModeResult]) -> Acceptance {
    let find = |mode| results.iter().find(|r| r.mode == mode);
    let (Some(kernel), Some(user)) = (find(Mode::Kernel), find(Mode::Userspace)) else {
        return Acceptance { ratio_at_least: 0.0, failure: Some("a mode did not run".into()) };
    };
    if kernel.refused == 0 || user.refused == 0 {
        return Acceptance { ratio_at_least: 0.0, failure: Some("a mode refused no connection".into()) };
    }
    let (kernel_us, kernel_resolution) = kernel.cpu_per_refused_us();
    let (user_us, _) = user.cpu_per_refused_us();
    // The kernel figure is at most its value plus one tick's worth.
    let ratio_at_least = user_us / (kernel_us + kernel_resolution);
    let failure = (ratio_at_least < REQUIRED_RATIO).then(|| {
        format!(
            "refused connections cost {user_us:.2} µs userspace-only and up to {:.2} µs with kernel assist \
             ({ratio_at_least:.1}×, need {REQUIRED_RATIO}×)",
            kernel_us + kernel_resolution
        )
    });
    Acceptance { ratio_at_least, failure }
}

fn render_markdown(args: &BenchArgs, pinning: Pinning, revision: &str, results: &[ModeResult]) -> String {
    let mut out = format!("# Turnstile kernel-assist benchmark ({revision})\n\n");
    let pinned = pinning.describe("gateway", "engine, clients and flooder");
    let _ = writeln!(
        out,
        "A penalised client ({FLOODER}) opens connections in a loop paced at {FLOOD_PER_SECOND} per second \
         ({} ms connect timeout, at most {MAX_FLOOD_ATTEMPTS} attempts) while {NORMAL_CONNECTIONS} keep-alive \
         clients send chat requests; \
         {} s per period, in a private network namespace; {pinned}; {} CPUs. Gateway CPU per refused \
         connection = (gateway CPU during the flood alone − gateway CPU over an idle period) / connections \
         the gateway counted as refused; normal clients are measured alone and during the flood.\n",
        FLOOD_CONNECT_TIMEOUT.as_millis(),
        args.seconds,
        pinning.cpus,
    );
    out.push_str(
        "| mode | flood attempts | refused by gateway | gateway CPU ms (idle → flood) | gateway CPU µs / refused | \
         normal req/s (alone → flood) | p50 ms (alone → flood) | p99 ms (alone → flood) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for result in results {
        let (per_refused, resolution) = result.cpu_per_refused_us();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} → {} | {per_refused:.2} (±{resolution:.2}) | {:.0} → {:.0} | {} → {} | {} → {} |",
            result.mode.label(),
            result.attempts,
            result.refused,
            result.idle_cpu.as_millis(),
            result.flood_only_cpu.as_millis(),
            result.baseline.requests_per_second(),
            result.flood.requests_per_second(),
            format_ms(result.baseline.percentile_ms(50.0)),
            format_ms(result.flood.percentile_ms(50.0)),
            format_ms(result.baseline.percentile_ms(99.0)),
            format_ms(result.flood.percentile_ms(99.0)),
        );
    }
    let check = acceptance(results);
    let _ = writeln!(
        out,
        "\nAcceptance (refused connections cost the gateway ≥ {REQUIRED_RATIO}× less CPU with kernel assist): {} \
         — at least {:.1}×.",
        if check.failure.is_none() { "PASS" } else { "FAIL" },
        check.ratio_at_least
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(completed: u64) -> LoadReport {
        LoadReport {
            completed,
            errors: 0,
            first_error: None,
            latencies_us: vec![1000, 2000],
            measured: Duration::from_secs(10),
        }
    }

    fn result(mode: Mode, flood_only_cpu_ms: u64, refused: u64) -> ModeResult {
        ModeResult {
            mode,
            baseline: report(10_000),
            flood: report(8_000),
            idle_cpu: Duration::from_millis(20),
            flood_only_cpu: Duration::from_millis(flood_only_cpu_ms),
            refused,
            attempts: refused,
        }
    }

    #[test]
    fn cpu_per_refused_is_the_flood_cpu_above_idle() {
        // 320 ms against 20 ms idle for 10 000 refusals: 30 µs each.
        let (per_refused, _) = result(Mode::Userspace, 320, 10_000).cpu_per_refused_us();
        assert!((per_refused - 30.0).abs() < 1e-6, "{per_refused}");
        // Less than idle (clock-tick noise): clamped at zero.
        assert_eq!(result(Mode::Kernel, 10, 100_000).cpu_per_refused_us().0, 0.0);
    }

    #[test]
    fn acceptance_needs_five_times_less_cpu_with_kernel_assist() {
        let passing = [result(Mode::Kernel, 20, 50_000), result(Mode::Userspace, 700, 50_000)];
        assert!(acceptance(&passing).failure.is_none());
        let failing = [result(Mode::Kernel, 300, 50_000), result(Mode::Userspace, 700, 50_000)];
        assert!(acceptance(&failing).failure.is_some());
        let markdown = render_markdown(
            &BenchArgs {
                gateway_env: Vec::new(),
                perf: false,
                suite: super::super::Suite::Kernel,
                connections: 4,
                seconds: 10,
                warmup_seconds: 2,
                peers: super::super::peers::PeerArgs::default(),
                fleet: super::super::fleet::FleetArgs::default(),
            },
            Pinning { gateway: Some(0), others: Some(1), cpus: 2 },
            "abc",
            &passing,
        );
        assert!(markdown.contains("| kernel assist |"), "{markdown}");
        assert!(markdown.contains("PASS"), "{markdown}");
    }
}
