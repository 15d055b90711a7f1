//! `cargo xtask bench fleet`: what engine scraping and routing cost the gateway as the fleet
//! grows (issue 23, item 5).
//!
//! The pods are one nginx process (one worker, on the load generator's CPU) listening on one
//! loopback port per pod. `GET /metrics` answers the vLLM-shaped page of the parser bench
//! (`gateway-user/benches/fixtures/vllm-metrics.prom`), or, when asked for samples by name
//! (`?name[]=…`, as the gateway asks), what prometheus_client renders for that query
//! (`vllm-metrics-filtered.prom`); `POST /v1/chat/completions` answers a canned completion.
//! nginx logs each `/metrics` request with its time and port: that log is how the scrapes the
//! engines receive are counted.
//!
//! Per fleet size (`--pods`, default 2, 100, 500, 1000) and replica count (`--replicas`,
//! default 1 and 4): release gateway replicas discover every pod from one pods file and scrape
//! with the default settings plus any `--gateway-arg`; several replicas share a throwaway
//! `redis-server` (`--redis-url`). Once every replica has scraped every pod and 3 s have passed:
//!
//! 1. idle (`--idle-seconds`, no traffic): each replica's CPU (utime + stime from /proc, % of
//!    one core; the table shows the mean over replicas) and the `/metrics` requests nginx
//!    logged, per pod per second, all replicas together;
//! 2. `aibrix_gateway_pod_metrics_age_seconds` read 5 times from every replica, after the idle
//!    period so the reads cost nothing there: p99 over pods, replicas and readings;
//! 3. load: `--connections` keep-alive connections to replica 0 for `--warmup-seconds` +
//!    `--seconds`, once per strategy (`least-request`, then the metric-driven
//!    `least-kv-cache`, named in the `routing-strategy` header): req/s, p50/p99 and replica 0's
//!    CPU per request, its scraping included (raw, nothing subtracted).
//!
//! Per fleet size, once the replicas are gone, a baseline: a second nginx as the reverse proxy
//! in the gateway's place, in front of the same engine ports (a master and one worker,
//! `least_conn` over a `server` per pod, an upstream keep-alive pool with room for a
//! connection to every pod), under the same load without the header: req/s, p50/p99 and its
//! master's + worker's CPU per request. The report divides each fleet size's CPU per request by
//! the smallest fleet's, the gateway's (1 replica) next to nginx's: how much of the gateway's
//! growth any proxy pays (loopback wakeups, cold upstream sockets).
//!
//! With 1 replica among `--replicas` and more than one fleet size, the largest fleet's engines
//! also measure that growth in turns: a replica discovering the smallest fleet's pods (the
//! first of the engines') and one discovering all run side by side, each round measuring one
//! then the other per strategy while the other is paused (SIGSTOP), so each round's ratio pairs
//! two windows seconds apart. The per-size runs are minutes apart, and on a shared host a slow
//! spell moves the large fleet's figure (its working set is out of cache) more than the small's.
//!
//! All replicas (or the nginx proxy) are pinned to CPU 0 together, the engines' nginx, Redis
//! and the load generator to CPU 1: with 4 replicas one replica gets at most a quarter of a
//! core. CPU 0's busy time (/proc/stat) less the replicas' shows what other processes took from
//! them; the report names the runs where that was noticeable. Results in
//! `target/bench/fleet.md` (with an ASCII chart) and `target/bench/fleet.json`; logs and the
//! nginx configurations in `target/bench/fleet/`. Bounded: every wait has a timeout, each load
//! period ends on time, traffic stays on 127.0.0.1, and both nginx (the proxy's worker too),
//! Redis and the gateways are killed on every way out (their guards), Ctrl-C included.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde_json::{Value, json};
use testkit::PodSpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    BenchArgs, MODEL, Pinning, bench_dir, block_on_until_stopped, format_ms, peers, per_request_us, pin_for_run,
    publish_report, revision, summarize,
};
use crate::client::Client;
use crate::loadgen::{self, LoadReport, LoadSpec, Schedule};
use crate::procs::{self, ChildGuard, ServerSpec, StdoutTo};
use crate::setup::{self, Strictness};
use crate::stack::{self, Binaries, Gateway, GatewaySpec, Profile};
use crate::{stop, ui};

/// Where the engine pages live, relative to the workspace root (the parser bench's fixtures).
const FIXTURES: &str = "gateway-user/benches/fixtures";
/// A vLLM engine's whole `/metrics` page.
const FULL_PAGE: &str = "vllm-metrics.prom";
/// The same engine's answer to the gateway's `name[]` query.
const FILTERED_PAGE: &str = "vllm-metrics-filtered.prom";
/// A `name[]` query, to check that nginx answers it with the filtered page.
const FILTER_PROBE: &str = "/metrics?name%5B%5D=vllm%3Anum_requests_running";
/// The strategies the load runs with: the default, then one that reads engine metrics.
const STRATEGIES: [&str; 2] = ["least-request", "least-kv-cache"];
/// The strategy cell of the baseline's rows: nginx as the proxy in the gateway's place.
const NGINX_PROXY: &str = "nginx proxy (baseline)";
/// What runs pinned to CPU 0, and what shares CPU 1 with the load generator.
const PINNED: &str = "gateway replicas (or the nginx proxy)";
const SHARING: &str = "the engines' nginx, Redis and load generator";
/// Bounds on the options: ports come from below the ephemeral range, and each pod costs
/// every replica a connection.
const MAX_PODS: usize = 5_000;
const MAX_REPLICAS: usize = 8;
const MAX_IDLE_SECONDS: u64 = 600;
/// How long the replicas get to scrape every pod once.
const ALL_SCRAPED_TIMEOUT: Duration = Duration::from_secs(60);
/// Quiet time between "every pod scraped" and the idle period.
const SETTLE: Duration = Duration::from_secs(3);
/// Readings of the metrics ages per replica, and the time between two.
const AGE_READINGS: usize = 5;
const AGE_READING_INTERVAL: Duration = Duration::from_millis(400);
/// nginx writes its buffered scrape log at least this often (`flush=` in its configuration).
const LOG_FLUSH: Duration = Duration::from_secs(1);
/// How long nginx or Redis may take to serve after starting.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a child gets to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// One read of a replica's admin `/metrics`.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The completion tokens of the canned answer (and the load's `max_tokens`).
const ANSWER_TOKENS: u32 = 16;
/// The gateway's gauge of the time since each pod was last scraped.
const AGE_SERIES: &str = "aibrix_gateway_pod_metrics_age_seconds";
/// Other processes using this much of the gateways' CPU during a period make its numbers
/// noisy, and the report says so.
const NOISY_PERCENT: f64 = 5.0;
/// Most measured rounds per strategy.
const MAX_ROUNDS: usize = 9;
/// Characters of the longest bar of the ASCII chart.
const CHART_WIDTH: usize = 40;

/// Options of the fleet suite (ignored by the other suites).
#[derive(Debug, Clone, Default, Args)]
pub struct FleetArgs {
    /// Fleet suite: fleet sizes to measure, pods, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [2, 100, 500, 1000])]
    pub pods: Vec<usize>,
    /// Fleet suite: gateway replica counts, comma-separated; several replicas share a Redis.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4])]
    pub replicas: Vec<usize>,
    /// Fleet suite: the period without traffic over which gateway CPU and engine scrapes are
    /// measured, seconds.
    #[arg(long, default_value_t = 5)]
    pub idle_seconds: u64,
    /// Fleet suite: a further flag for every gateway replica, repeatable
    /// (`--gateway-arg=--pod-metric-refresh-interval-ms=100`).
    #[arg(long = "gateway-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub gateway_args: Vec<String>,
    /// Fleet suite: measured rounds per strategy and per baseline, taken in turn (one round of
    /// each, then the next); the round with the median CPU per request is reported, so a
    /// passing disturbance on a shared machine does not decide a row.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// Runs the suite.
pub fn run(args: &BenchArgs) -> Result<()> {
    validate(args)?;
    let pages = Pages::find(&procs::workspace_root().join(FIXTURES))?;
    setup::run(Strictness::Lenient)?;
    let binaries = Binaries::build(Profile::Release, "bench fleet")?;
    let step = ui::step("bench fleet: find or install nginx and redis-server");
    let (nginx, nginx_version) = super::peers::install_nginx().map_err(|reason| anyhow!("nginx: {reason}"))?;
    let redis = if args.fleet.replicas.iter().any(|&replicas| replicas > 1) {
        let redis = procs::find_program("redis-server").ok_or_else(|| {
            anyhow!("redis-server is not installed (`cargo xtask setup` installs it); replicas share one")
        })?;
        Some(redis)
    } else {
        None
    };
    let open_files = raise_open_files_limit();
    ui::info(format!("open files limit (inherited by nginx and the gateways): {open_files}"));
    step.done();
    let pinning = pin_for_run(PINNED, SHARING)?;
    let tools = Tools { binaries, nginx, nginx_version, redis, pages, open_files };
    block_on_until_stopped(fleet_async(args, &tools, pinning))
}

fn validate(args: &BenchArgs) -> Result<()> {
    let fleet = &args.fleet;
    if args.connections == 0 || args.seconds == 0 {
        bail!("--connections and --seconds must be at least 1");
    }
    if !(1..=MAX_IDLE_SECONDS).contains(&fleet.idle_seconds) {
        bail!("--idle-seconds must be between 1 and {MAX_IDLE_SECONDS}");
    }
    if !(1..=MAX_ROUNDS).contains(&fleet.rounds) {
        bail!("--rounds must be between 1 and {MAX_ROUNDS}");
    }
    if fleet.pods.is_empty() || fleet.pods.iter().any(|&pods| !(1..=MAX_PODS).contains(&pods)) {
        bail!("--pods: each fleet size must be between 1 and {MAX_PODS}");
    }
    if fleet.replicas.is_empty() || fleet.replicas.iter().any(|&replicas| !(1..=MAX_REPLICAS).contains(&replicas)) {
        bail!("--replicas: each count must be between 1 and {MAX_REPLICAS}");
    }
    Ok(())
}

/// What the suite found, built or installed before the run.
struct Tools {
    binaries: Binaries,
    nginx: PathBuf,
    nginx_version: String,
    /// redis-server, when some run has several replicas.
    redis: Option<PathBuf>,
    pages: Pages,
    /// The open-files limit the children inherit.
    open_files: u64,
}

/// The two `/metrics` pages nginx serves, read from the repository at run time.
struct Pages {
    dir: PathBuf,
    full_bytes: usize,
    filtered_bytes: usize,
}

impl Pages {
    fn find(dir: &Path) -> Result<Self> {
        let size = |name: &str| -> Result<usize> {
            let path = dir.join(name);
            let meta = std::fs::metadata(&path).with_context(|| {
                format!("{} is missing: the fleet bench serves the parser bench's fixture pages", path.display())
            })?;
            usize::try_from(meta.len()).context("page size")
        };
        Ok(Self { dir: dir.to_path_buf(), full_bytes: size(FULL_PAGE)?, filtered_bytes: size(FILTERED_PAGE)? })
    }
}

/// Raises this process's soft open-files limit to its hard limit, for the children to inherit
/// (a gateway keeps a scrape connection per pod, nginx a socket per port and per connection);
/// returns the limit in force.
fn raise_open_files_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        // Best effort: the run reports the limit it got.
        let _ = setrlimit(Resource::Nofile, Rlimit { current: limit.maximum, maximum: limit.maximum });
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// One (pods, replicas) run: its numbers, or why it has none.
struct Run {
    pods: usize,
    replicas: usize,
    outcome: std::result::Result<Measured, String>,
}

struct Measured {
    /// From starting the first replica to every replica having scraped every pod.
    ready_after: Duration,
    /// Pods the least advanced replica had still not scraped when the wait gave up.
    unscraped_at_start: usize,
    idle: Idle,
    ages: Ages,
    loads: Vec<Load>,
    /// Warning and error lines in the replicas' logs, and the first one.
    log_warnings: usize,
    first_warning: Option<String>,
}

/// The idle period: CPU per replica and the scrapes nginx served.
struct Idle {
    elapsed: Duration,
    /// Per replica, % of one core.
    cpu_percent: Vec<f64>,
    /// What other processes used of the replicas' CPU meanwhile, % (when pinned).
    others_percent: Option<f64>,
    scrapes: ScrapeCount,
    /// Per replica, its open file descriptors after the idle period (a scrape connection per
    /// pod among them).
    open_files: Vec<Option<usize>>,
}

impl Idle {
    fn cpu_percent_mean(&self) -> f64 {
        self.cpu_percent.iter().sum::<f64>() / self.cpu_percent.len().max(1) as f64
    }

    /// Scrapes each engine received per second, all replicas together.
    fn scrapes_per_engine_per_second(&self, pods: usize) -> f64 {
        self.scrapes.total as f64 / pods.max(1) as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

/// `/metrics` requests nginx served in a period: all of them, and the least and most one
/// pod got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ScrapeCount {
    total: u64,
    per_pod_min: u64,
    per_pod_max: u64,
}

/// The metrics ages the replicas reported.
struct Ages {
    /// Every age read, seconds, sorted.
    seconds: Vec<f64>,
    /// The most pods one reading lacked (never scraped by that replica).
    unscraped: usize,
}

/// One strategy's load through replica 0 (or the baseline's through the nginx proxy).
struct Load {
    strategy: &'static str,
    report: LoadReport,
    /// Replica 0's CPU per completed request, microseconds (the nginx proxy's: master + worker).
    cpu_us: f64,
    /// What other processes used of the replicas' CPU meanwhile, % (when pinned).
    others_percent: Option<f64>,
    /// `cpu_us` of every round, in the order they ran (this load is the median one).
    rounds_cpu_us: Vec<f64>,
}

impl Load {
    /// The round with the median CPU per request (the lower middle of an even count), carrying
    /// every round's figure; `None` for no rounds.
    fn median(mut rounds: Vec<Load>) -> Option<Load> {
        let all: Vec<f64> = rounds.iter().map(|load| load.cpu_us).collect();
        rounds.sort_by(|a, b| a.cpu_us.total_cmp(&b.cpu_us));
        let middle = rounds.len().checked_sub(1)? / 2;
        let mut load = rounds.swap_remove(middle);
        load.rounds_cpu_us = all;
        Some(load)
    }
}

/// The nginx proxy in the gateway's place for one fleet size: its load, or why it has none.
struct Baseline {
    pods: usize,
    outcome: std::result::Result<Load, String>,
}

async fn fleet_async(args: &BenchArgs, tools: &Tools, pinning: Pinning) -> Result<()> {
    let out_dir = bench_dir()?;
    let run_dir = out_dir.join("fleet");
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let client = Client::new();
    let most_replicas = args.fleet.replicas.iter().copied().max().unwrap_or(1);
    let mut runs = Vec::new();
    let mut baselines = Vec::new();
    let mut turns: Option<std::result::Result<Turns, String>> = None;
    let smallest = args.fleet.pods.iter().copied().min().unwrap_or(0);
    let largest = args.fleet.pods.iter().copied().max().unwrap_or(0);
    // The growth in turns runs on the largest fleet's engines.
    let in_turns = |pods: usize| pods == largest && smallest < largest && args.fleet.replicas.contains(&1);
    for &pods in &args.fleet.pods {
        stop::check()?;
        let step = ui::step(format!("bench fleet: {pods} pods on one nginx"));
        let connections = nginx_connections(pods, most_replicas, args.connections);
        let started = Engines::start(tools, pods, connections, pinning, &run_dir, &client).await;
        step.done();
        let mut engines = match started {
            Ok(engines) => engines,
            Err(err) => {
                stop::check()?;
                let reason = format!("{err:#}");
                ui::warn(format!("skipped: {reason}"));
                for &replicas in &args.fleet.replicas {
                    runs.push(Run { pods, replicas, outcome: Err(reason.clone()) });
                }
                if in_turns(pods) {
                    turns = Some(Err(reason.clone()));
                }
                baselines.push(Baseline { pods, outcome: Err(reason) });
                continue;
            }
        };
        for &replicas in &args.fleet.replicas {
            let title = format!("bench fleet: {pods} pods, {replicas} gateway replica(s)");
            let measured = measure(args, tools, pinning, &mut engines, replicas, &run_dir, &client);
            runs.push(Run { pods, replicas, outcome: in_step(title, measured).await? });
        }
        if in_turns(pods) {
            let title = format!("bench fleet: {smallest} and {pods} pods in turns, 1 replica each");
            let measured = measure_turns(args, tools, pinning, &mut engines, smallest, &run_dir, &client);
            turns = Some(in_step(title, measured).await?);
        }
        let title = format!("bench fleet: {pods} pods, nginx as the proxy (baseline)");
        let measured = measure_nginx_proxy(args, tools, pinning, &mut engines, &run_dir);
        baselines.push(Baseline { pods, outcome: in_step(title, measured).await? });
        engines.stop().await?;
    }

    let settings = Settings {
        revision: revision(),
        cpus: pinning.cpus,
        cpu_model: cpu_model(),
        pinning: pinning.describe(PINNED, SHARING),
        nginx_version: tools.nginx_version.clone(),
        full_page_bytes: tools.pages.full_bytes,
        filtered_page_bytes: tools.pages.filtered_bytes,
        gateway_args: args.fleet.gateway_args.clone(),
        connections: args.connections,
        warmup_seconds: args.warmup_seconds,
        seconds: args.seconds,
        idle_seconds: args.fleet.idle_seconds,
        rounds: args.fleet.rounds,
        open_files: tools.open_files,
    };
    let turns = turns.as_ref();
    publish_report(&out_dir, "fleet.md", &render_markdown(&settings, &runs, &baselines, turns))?;
    let json_path = out_dir.join("fleet.json");
    let json = serde_json::to_string_pretty(&render_json(&settings, &runs, &baselines, turns))
        .context("rendering fleet.json")?;
    std::fs::write(&json_path, json + "\n").with_context(|| format!("writing {}", json_path.display()))?;
    ui::info(format!("raw numbers in {}", json_path.display()));
    if runs.iter().all(|run| run.outcome.is_err()) {
        bail!("no run measured anything; see the logs in {}", run_dir.display());
    }
    Ok(())
}

/// The load a strategy is measured with: `--connections` to `target`, the strategy named in
/// the `routing-strategy` header.
fn strategy_load(args: &BenchArgs, target: SocketAddr, strategy: &str) -> LoadSpec {
    LoadSpec {
        targets: vec![target],
        connections: args.connections,
        model: MODEL.into(),
        stream: false,
        max_tokens: ANSWER_TOKENS,
        headers: vec![("routing-strategy".into(), strategy.into())],
    }
}

/// The pods file's entries for `ports`, named `pod-0000` on.
fn pod_specs(ports: &[u16]) -> Vec<PodSpec> {
    ports.iter().enumerate().map(|(index, &port)| PodSpec::new(&format!("pod-{index:04}"), MODEL, port)).collect()
}

/// Runs `measured` as a step titled `title`: its outcome, or why it failed (and a warning);
/// an error only when the run is to stop.
async fn in_step<T>(
    title: String,
    measured: impl std::future::Future<Output = Result<T>>,
) -> Result<std::result::Result<T, String>> {
    stop::check()?;
    let step = ui::step(title);
    let outcome = measured.await;
    stop::check()?;
    if let Err(err) = &outcome {
        ui::warn(format!("failed: {err:#}"));
    }
    step.done();
    Ok(outcome.map_err(|err| format!("{err:#}")))
}

/// Connections nginx must hold: a listening socket per pod, a scrape connection per pod and
/// replica (and a spare while one reconnects), the load's connections twice (the nginx proxy's
/// in flight next to its idle pool, which the scrape connections' room covers), and slack.
fn nginx_connections(pods: usize, replicas: usize, load_connections: usize) -> usize {
    pods + 2 * pods * replicas + 2 * load_connections + 512
}

/// The fleet's engines: one nginx listening on a loopback port per pod.
struct Engines {
    ports: Vec<u16>,
    child: ChildGuard,
    /// `$msec $server_port` per `/metrics` request.
    scrape_log: PathBuf,
    /// The pods file every replica discovers the pods from.
    pods_file: PathBuf,
}

impl Engines {
    async fn start(
        tools: &Tools,
        pods: usize,
        connections: usize,
        pinning: Pinning,
        run_dir: &Path,
        client: &Client,
    ) -> Result<Self> {
        let ports = (0..pods)
            .map(|_| testkit::free_port())
            .collect::<std::io::Result<Vec<u16>>>()
            .context("choosing loopback ports for the pods")?;
        let dir = run_dir.join(format!("nginx-{pods}"));
        std::fs::create_dir_all(dir.join("tmp")).with_context(|| format!("creating {}", dir.display()))?;
        let scrape_log = dir.join("scrapes.log");
        let conf = dir.join("nginx.conf");
        let config =
            NginxConfig { dir: &dir, pages: &tools.pages.dir, scrape_log: &scrape_log, ports: &ports, connections };
        std::fs::write(&conf, nginx_config(&config)).with_context(|| format!("writing {}", conf.display()))?;
        if u64::try_from(connections).unwrap_or(u64::MAX) > tools.open_files {
            ui::warn(format!("nginx may need {connections} open files; the limit is {}", tools.open_files));
        }
        let mut child = spawn_nginx(tools, "nginx", &dir, &conf, pinning.others)?;
        wait_serving(&mut child, &ports, &tools.pages, client).await?;
        let pods_file = dir.join("pods.yaml");
        stack::write_pods(&pods_file, &pod_specs(&ports))?;
        ui::info(format!("nginx {} serving {pods} pods, configuration {}", tools.nginx_version, dir.display()));
        Ok(Self { ports, child, scrape_log, pods_file })
    }

    /// Empties the scrape log, so a run reads only its own scrapes (nginx appends to it, so
    /// its next line lands at the new end).
    fn clear_scrape_log(&self) -> Result<()> {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.scrape_log)
            .with_context(|| format!("emptying {}", self.scrape_log.display()))?;
        Ok(())
    }

    /// The scrapes logged between `from` and `to` (Unix seconds).
    fn scrapes_between(&self, from: f64, to: f64) -> Result<ScrapeCount> {
        let log = std::fs::read_to_string(&self.scrape_log)
            .with_context(|| format!("reading {}", self.scrape_log.display()))?;
        Ok(summarize_scrapes(&count_scrapes(&log, from, to), &self.ports))
    }

    /// An error when nginx has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.exited() {
            bail!("nginx exited ({status}); log {}:\n{}", self.child.log().display(), self.child.log_tail(20));
        }
        Ok(())
    }

    async fn stop(self) -> Result<()> {
        let outcome = self.child.stop(STOP_GRACE).await.context("stopping nginx")?;
        ui::info(format!("nginx: {outcome}"));
        Ok(())
    }
}

/// How nginx serves the fleet.
struct NginxConfig<'a> {
    /// Its prefix: temp paths and pid file.
    dir: &'a Path,
    /// The directory holding [`FULL_PAGE`] and [`FILTERED_PAGE`].
    pages: &'a Path,
    scrape_log: &'a Path,
    ports: &'a [u16],
    /// Connections (and open files) to allow.
    connections: usize,
}

/// The canned chat completion every pod answers.
const CHAT_ANSWER: &str = r#"{"id":"chatcmpl-fleet","object":"chat.completion","created":1700000000,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":16,"completion_tokens":16,"total_tokens":32}}"#;

/// One worker, no master (a single process: killing it leaves no orphan), one server block
/// listening on every pod's port. `/metrics` is a static file chosen by the query, logged
/// per request with its time and port (buffered, flushed every second); the chat answer is
/// canned; nothing else is logged.
fn nginx_config(config: &NginxConfig<'_>) -> String {
    let NginxConfig { dir, pages, scrape_log, ports, connections } = config;
    let temp_paths = peers::nginx_temp_paths(dir);
    let dir = dir.display();
    let pages = pages.display();
    let scrape_log = scrape_log.display();
    let listens: String = ports.iter().map(|port| format!("    listen 127.0.0.1:{port};\n")).collect();
    let open_files = connections + 64;
    format!(
        "worker_processes 1;\nmaster_process off;\ndaemon off;\nworker_rlimit_nofile {open_files};\n\
         pid {dir}/nginx.pid;\nerror_log stderr warn;\n\
         events {{ worker_connections {connections}; multi_accept on; }}\n\
         http {{\n  access_log off;\n  server_tokens off;\n  sendfile on;\n  tcp_nodelay on;\n\
         \x20 keepalive_requests 1000000;\n  keepalive_timeout 300s;\n\
         \x20 open_file_cache max=16 inactive=60s;\n  open_file_cache_valid 60s;\n{temp_paths}\
         \x20 log_format scrape '$msec $server_port';\n\
         \x20 # prometheus_client filters on `name[]`; the gateway sends it percent-encoded.\n\
         \x20 map $args $metrics_page {{\n    \"~(^|&)name(%5B%5D|\\[\\])=\" {FILTERED_PAGE};\n    default {FULL_PAGE};\n  }}\n\
         \x20 server {{\n{listens}\
         \x20   location = /metrics {{\n      access_log {scrape_log} scrape buffer=64k flush={flush}s;\n\
         \x20     default_type \"text/plain; version=0.0.4; charset=utf-8\";\n      alias {pages}/$metrics_page;\n    }}\n\
         \x20   location = /v1/chat/completions {{\n      default_type application/json;\n      return 200 '{CHAT_ANSWER}';\n    }}\n\
         \x20   location / {{\n      return 404;\n    }}\n  }}\n}}\n",
        flush = LOG_FLUSH.as_secs(),
    )
}

/// How the baseline's nginx proxies to the fleet.
struct ProxyConfig<'a> {
    /// Its prefix: temp paths and pid file.
    dir: &'a Path,
    listen: SocketAddr,
    /// The pods' ports on 127.0.0.1.
    ports: &'a [u16],
    /// Idle upstream connections it keeps.
    keepalive: usize,
    /// Connections (and open files) to allow.
    connections: usize,
}

/// nginx in the gateway's place, as it runs in production: a master and one worker. It
/// balances with `least_conn` (nginx's least-request, placed before `keepalive` as nginx
/// requires) over a `server` per pod, keeps idle upstream connections in a pool and never
/// retires a connection, upstream or client, for its request count; nothing is logged.
fn nginx_proxy_config(config: &ProxyConfig<'_>) -> String {
    let ProxyConfig { dir, listen, ports, keepalive, connections } = config;
    let engines: Vec<SocketAddr> = ports.iter().map(|&port| SocketAddr::from(([127, 0, 0, 1], port))).collect();
    let upstream = format!("    least_conn;\n    keepalive {keepalive};\n    keepalive_requests 1000000;\n");
    let proxy = peers::nginx_proxy_blocks(*listen, &engines, &upstream);
    let temp_paths = peers::nginx_temp_paths(dir);
    let dir = dir.display();
    let open_files = connections + 64;
    format!(
        "worker_processes 1;\nmaster_process on;\ndaemon off;\nworker_rlimit_nofile {open_files};\n\
         pid {dir}/nginx.pid;\nerror_log stderr warn;\n\
         events {{ worker_connections {connections}; }}\n\
         http {{\n  access_log off;\n  server_tokens off;\n  tcp_nodelay on;\n\
         \x20 keepalive_requests 1000000;\n  keepalive_timeout 300s;\n{temp_paths}{proxy}}}\n"
    )
}

/// The nginx proxy's idle upstream pool: room for a connection to every pod (the gateway
/// keeps one per pod it has sent to) and the load's connections besides.
fn proxy_keepalive(pods: usize, load_connections: usize) -> usize {
    pods + load_connections
}

/// Connections the nginx proxy must hold: the load's, its idle pool, the load's in flight
/// upstream, and slack.
fn proxy_connections(keepalive: usize, load_connections: usize) -> usize {
    keepalive + 2 * load_connections + 512
}

/// Polls the first and the last pod until nginx answers the whole page to `/metrics` and the
/// filtered page to a `name[]` query on both, bounded.
async fn wait_serving(child: &mut ChildGuard, ports: &[u16], pages: &Pages, client: &Client) -> Result<()> {
    let probes: Vec<u16> = ports.first().into_iter().chain(ports.last()).copied().collect();
    let started = Instant::now();
    loop {
        if let Some(status) = child.exited() {
            bail!("nginx exited at start ({status}); log {}:\n{}", child.log().display(), child.log_tail(10));
        }
        let last = match check_pages(&probes, pages, client).await {
            Ok(()) => return Ok(()),
            Err(err) => format!("{err:#}"),
        };
        if started.elapsed() > START_TIMEOUT {
            bail!(
                "nginx did not serve the pages within {} (last: {last}); log {}:\n{}",
                ui::human(START_TIMEOUT),
                child.log().display(),
                child.log_tail(10)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn check_pages(ports: &[u16], pages: &Pages, client: &Client) -> Result<()> {
    for &port in ports {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        for (path, expected) in [("/metrics", pages.full_bytes), (FILTER_PROBE, pages.filtered_bytes)] {
            let reply = client.get(addr, path, Duration::from_secs(2)).await?;
            if !reply.status.is_success() || reply.body.len() != expected {
                bail!(
                    "GET {path} on port {port}: {} with {} bytes, expected 200 with {expected}",
                    reply.status,
                    reply.body.len()
                );
            }
        }
    }
    Ok(())
}

/// Requests per port in a `$msec $server_port` log whose time falls in `[from, to)` (Unix
/// seconds); other lines are skipped.
fn count_scrapes(log: &str, from: f64, to: f64) -> HashMap<u16, u64> {
    let mut counts = HashMap::new();
    for line in log.lines() {
        let mut fields = line.split_whitespace();
        let (Some(Ok(at)), Some(Ok(port))) =
            (fields.next().map(str::parse::<f64>), fields.next().map(str::parse::<u16>))
        else {
            continue;
        };
        if at >= from && at < to {
            *counts.entry(port).or_insert(0) += 1;
        }
    }
    counts
}

/// The total and the spread over `ports` (a pod nobody scraped counts as 0).
fn summarize_scrapes(counts: &HashMap<u16, u64>, ports: &[u16]) -> ScrapeCount {
    let per_pod = ports.iter().map(|port| counts.get(port).copied().unwrap_or(0));
    ScrapeCount {
        total: counts.values().sum(),
        per_pod_min: per_pod.clone().min().unwrap_or(0),
        per_pod_max: per_pod.max().unwrap_or(0),
    }
}

/// The values of [`AGE_SERIES`] in a gateway's `/metrics` text, seconds.
fn pod_metric_ages(text: &str) -> Vec<f64> {
    text.lines()
        .filter_map(|line| line.strip_prefix(AGE_SERIES)?.strip_prefix('{'))
        .filter_map(|rest| rest.rsplit_once('}')?.1.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Nearest-rank percentile of sorted samples, as [`loadgen::percentile`].
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p.clamp(0.0, 100.0) / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Seconds since the Unix epoch, as nginx's `$msec`.
fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |since| since.as_secs_f64())
}

/// One (pods, replicas) run on running engines: start the replicas, wait until they have
/// scraped every pod, settle, measure idle, read the ages, load per strategy, stop.
async fn measure(
    args: &BenchArgs,
    tools: &Tools,
    pinning: Pinning,
    engines: &mut Engines,
    replicas: usize,
    run_dir: &Path,
    client: &Client,
) -> Result<Measured> {
    let pods = engines.ports.len();
    engines.clear_scrape_log()?;
    let started = Instant::now();
    let mut fleet = Replicas::start(args, tools, pinning, engines, replicas, run_dir, client).await?;
    stack::wait_models_listed(client, fleet.gateways[0].listen, &[MODEL], Duration::from_secs(30)).await?;
    let unscraped_at_start = fleet.wait_all_scraped(client, pods).await?;
    let ready_after = started.elapsed();
    if unscraped_at_start > 0 {
        ui::warn(format!(
            "a replica had still not scraped {unscraped_at_start} of {pods} pods after {}; measuring anyway",
            ui::human(ALL_SCRAPED_TIMEOUT)
        ));
    } else {
        ui::info(format!("every replica scraped all {pods} pods within {}", ui::human(ready_after)));
    }
    tokio::time::sleep(SETTLE).await;

    let idle_period = Duration::from_secs(args.fleet.idle_seconds);
    let pids: Vec<u32> = fleet.gateways.iter().map(|gateway| gateway.child.pid()).collect();
    let from = unix_now();
    let cpu = CpuUse::over(&pids, pinning.gateway, Schedule::starting_now(Duration::ZERO, idle_period)).await?;
    let to = unix_now();
    let idle_ended = Instant::now();

    let ages = fleet.read_ages(client, pods).await?;
    // Every scrape of the idle period is in the log once nginx has flushed it.
    tokio::time::sleep_until((idle_ended + LOG_FLUSH + Duration::from_millis(500)).into()).await;
    let scrapes = engines.scrapes_between(from, to)?;
    let idle = Idle {
        elapsed: cpu.elapsed,
        cpu_percent: cpu.per_process.iter().map(|used| cpu.percent(*used)).collect(),
        others_percent: cpu.others_percent(),
        scrapes,
        open_files: pids.iter().map(|pid| open_files(*pid)).collect(),
    };
    ui::info(format!(
        "idle: {:.1}% CPU per replica, {:.1} scrapes/s per engine ({}..{} per pod), metrics age p99 {} ms{}",
        idle.cpu_percent_mean(),
        idle.scrapes_per_engine_per_second(pods),
        scrapes.per_pod_min,
        scrapes.per_pod_max,
        format_ms(percentile(&ages.seconds, 99.0).map(|seconds| seconds * 1000.0)),
        describe_others(idle.others_percent),
    ));
    fleet.check_alive(engines)?;

    let mut rounds: Vec<Vec<Load>> = STRATEGIES.iter().map(|_| Vec::new()).collect();
    for round in 1..=args.fleet.rounds {
        for (strategy, done) in STRATEGIES.into_iter().zip(&mut rounds) {
            stop::check()?;
            let spec = strategy_load(args, fleet.gateways[0].listen, strategy);
            let (report, cpu_us, others_percent) =
                measured_window(args, &spec, &pids, pinning, |used| used.first().copied().unwrap_or_default()).await?;
            ui::info(format!(
                "{strategy} (round {round} of {}): {}, replica 0 CPU {cpu_us:.1} µs/request{}",
                args.fleet.rounds,
                summarize(&report),
                describe_others(others_percent)
            ));
            fleet.check_alive(engines)?;
            done.push(Load { strategy, report, cpu_us, others_percent, rounds_cpu_us: Vec::new() });
        }
    }
    let loads: Vec<Load> = rounds.into_iter().filter_map(Load::median).collect();

    let logs: Vec<PathBuf> = fleet.gateways.iter().map(|gateway| gateway.child.log().to_path_buf()).collect();
    fleet.stop().await?;
    let (log_warnings, first_warning) = logs
        .iter()
        .map(|log| scan_log_warnings(&std::fs::read_to_string(log).unwrap_or_default()))
        .fold((0, None), |(count, first), (more, next)| (count + more, first.or(next)));
    if log_warnings > 0 {
        ui::warn(format!(
            "{log_warnings} warnings or errors in the gateway logs, first: {}",
            first_warning.as_deref().unwrap_or("-")
        ));
    }
    Ok(Measured { ready_after, unscraped_at_start, idle, ages, loads, log_warnings, first_warning })
}

/// One warm-up and measured window of `spec`'s load: the report, the CPU µs per completed
/// request of what `counted` takes from the CPU time of `pids`, and what other processes took
/// from their CPU meanwhile (%).
async fn measured_window(
    args: &BenchArgs,
    spec: &LoadSpec,
    pids: &[u32],
    pinning: Pinning,
    counted: fn(&[Duration]) -> Duration,
) -> Result<(LoadReport, f64, Option<f64>)> {
    let schedule = Schedule::starting_now(Duration::from_secs(args.warmup_seconds), Duration::from_secs(args.seconds));
    let (report, cpu) = tokio::join!(loadgen::run(spec, schedule), CpuUse::over(pids, pinning.gateway, schedule));
    let (report, cpu) = (report?, cpu?);
    let cpu_us = per_request_us(counted(&cpu.per_process), &report);
    Ok((report, cpu_us, cpu.others_percent()))
}

/// The baseline on running engines: a second nginx as the reverse proxy in the gateway's place,
/// pinned where the replicas run, under the load the strategies run with (without the
/// `routing-strategy` header); its CPU per request is its master's and worker's.
async fn measure_nginx_proxy(
    args: &BenchArgs,
    tools: &Tools,
    pinning: Pinning,
    engines: &mut Engines,
    run_dir: &Path,
) -> Result<Load> {
    let pods = engines.ports.len();
    let dir = run_dir.join(format!("nginx-proxy-{pods}"));
    std::fs::create_dir_all(dir.join("tmp")).with_context(|| format!("creating {}", dir.display()))?;
    let keepalive = proxy_keepalive(pods, args.connections);
    let connections = proxy_connections(keepalive, args.connections);
    let listen = stack::free_addr()?;
    let conf = dir.join("nginx.conf");
    let config = ProxyConfig { dir: &dir, listen, ports: &engines.ports, keepalive, connections };
    std::fs::write(&conf, nginx_proxy_config(&config)).with_context(|| format!("writing {}", conf.display()))?;
    if u64::try_from(connections).unwrap_or(u64::MAX) > tools.open_files {
        ui::warn(format!("the nginx proxy may need {connections} open files; the limit is {}", tools.open_files));
    }
    let mut proxy = NginxProxy::start(tools, &dir, &conf, pinning)?;
    peers::wait_answering(&mut proxy.master, listen).await?;
    let pids = peers::process_tree(proxy.master.pid());
    if pids.len() != 2 {
        bail!("the nginx proxy runs {} processes, not a master and one worker", pids.len());
    }
    ui::info(format!(
        "nginx proxy on {listen}: least_conn over {pods} pods, keepalive {keepalive}, configuration {}",
        dir.display()
    ));
    let spec = LoadSpec {
        targets: vec![listen],
        connections: args.connections,
        model: MODEL.into(),
        stream: false,
        max_tokens: ANSWER_TOKENS,
        headers: Vec::new(),
    };
    let mut rounds = Vec::new();
    for round in 1..=args.fleet.rounds {
        stop::check()?;
        let (report, cpu_us, others_percent) =
            measured_window(args, &spec, &pids, pinning, |used| used.iter().sum()).await?;
        ui::info(format!(
            "{NGINX_PROXY} (round {round} of {}): {}, master + worker CPU {cpu_us:.1} µs/request{}",
            args.fleet.rounds,
            summarize(&report),
            describe_others(others_percent)
        ));
        engines.check_alive()?;
        if let Some(status) = proxy.master.exited() {
            bail!(
                "the nginx proxy exited ({status}); log {}:\n{}",
                proxy.master.log().display(),
                proxy.master.log_tail(20)
            );
        }
        if report.completed == 0 {
            bail!("no request completed (first error: {})", report.first_error.as_deref().unwrap_or("none"));
        }
        rounds.push(Load { strategy: NGINX_PROXY, report, cpu_us, others_percent, rounds_cpu_us: Vec::new() });
    }
    ui::info(format!("nginx proxy: {}", proxy.stop().await));
    Load::median(rounds).ok_or_else(|| anyhow!("no round was measured"))
}

/// nginx with prefix `dir` and configuration `conf`, logging to `dir/nginx.log`, pinned to `cpu`.
fn spawn_nginx(tools: &Tools, name: &str, dir: &Path, conf: &Path, cpu: Option<usize>) -> Result<ChildGuard> {
    let args: Vec<OsString> = vec![
        "-p".into(),
        dir.as_os_str().to_owned(),
        "-c".into(),
        conf.as_os_str().to_owned(),
        "-e".into(),
        "stderr".into(),
    ];
    ChildGuard::spawn(ServerSpec {
        name: name.into(),
        program: tools.nginx.clone(),
        args,
        log: dir.join("nginx.log"),
        stdout: StdoutTo::Log,
        env: Vec::new(),
        env_remove: Vec::new(),
        cpu,
    })
}

/// The baseline's nginx: a master and its worker. SIGKILL, a guard's way out, reaches the
/// master alone and would leave the worker serving, so dropping this kills the worker too.
struct NginxProxy {
    master: ChildGuard,
}

impl NginxProxy {
    fn start(tools: &Tools, dir: &Path, conf: &Path, pinning: Pinning) -> Result<Self> {
        // The worker inherits the master's CPU.
        let master = spawn_nginx(tools, "nginx proxy", dir, conf, pinning.gateway)?;
        Ok(Self { master })
    }

    /// nginx's own shutdown: SIGTERM to the master, which ends its worker and exits; past
    /// [`STOP_GRACE`], the drop kills both. How it ended.
    async fn stop(mut self) -> String {
        let master = i32::try_from(self.master.pid()).ok().and_then(rustix::process::Pid::from_raw);
        if let Some(master) = master {
            let _ = rustix::process::kill_process(master, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = self.master.exited() {
                return format!("stopped ({status})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        format!("killed (did not stop within {} of SIGTERM)", ui::human(STOP_GRACE))
    }
}

impl Drop for NginxProxy {
    /// Kills the master first (so it cannot start another worker), then what ran under it;
    /// the guard then reaps the master.
    fn drop(&mut self) {
        use rustix::process::{Pid, Signal, kill_process};
        if self.master.exited().is_some() {
            return;
        }
        // Unreaped, the master's pid and its children's parent link stay its own.
        let tree = peers::process_tree(self.master.pid());
        for pid in tree {
            if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
                let _ = kill_process(pid, Signal::KILL);
            }
        }
    }
}

/// CPU time used during a measured period: by each process, and by anyone on the CPU they
/// are pinned to.
struct CpuUse {
    elapsed: Duration,
    per_process: Vec<Duration>,
    /// Busy time of the processes' CPU (all processes on it), when pinned.
    cpu_busy: Option<Duration>,
}

impl CpuUse {
    /// Samples `pids` (and `cpu`, the one they are pinned to) at the start and the end of
    /// the measured period of `schedule`.
    async fn over(pids: &[u32], cpu: Option<usize>, schedule: Schedule) -> Result<Self> {
        tokio::time::sleep_until(schedule.measure_start.into()).await;
        let started = Instant::now();
        let busy_before = cpu.and_then(cpu_busy_time);
        let before = pids.iter().map(|&pid| procs::process_cpu_time(pid)).collect::<Result<Vec<_>>>()?;
        tokio::time::sleep_until(schedule.measure_end.into()).await;
        let after = pids.iter().map(|&pid| procs::process_cpu_time(pid)).collect::<Result<Vec<_>>>()?;
        let busy_after = cpu.and_then(cpu_busy_time);
        let per_process = before.iter().zip(&after).map(|(before, after)| after.saturating_sub(*before)).collect();
        let cpu_busy = busy_before.zip(busy_after).map(|(before, after)| after.saturating_sub(before));
        Ok(Self { elapsed: started.elapsed(), per_process, cpu_busy })
    }

    /// `used` as % of one core over the period.
    fn percent(&self, used: Duration) -> f64 {
        used.as_secs_f64() * 100.0 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    /// What other processes used of the CPU, %: its busy time less the sampled processes'.
    fn others_percent(&self) -> Option<f64> {
        let ours: Duration = self.per_process.iter().sum();
        self.cpu_busy.map(|busy| self.percent(busy.saturating_sub(ours)))
    }
}

/// Time one CPU has run processes so far (or lost them to the hypervisor), from /proc/stat.
fn cpu_busy_time(cpu: usize) -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks = parse_cpu_busy_ticks(&stat, cpu)?;
    let per_second = rustix::param::clock_ticks_per_second().max(1);
    Some(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// The ticks of `cpuN` in a /proc/stat text spent in user, nice, system and steal (fields 1-3
/// and 8; guest time is already in user and nice). Interrupt time is left out: on loopback
/// it is mostly the gateways' own packets, which their utime + stime do not hold either.
fn parse_cpu_busy_ticks(stat: &str, cpu: usize) -> Option<u64> {
    let name = format!("cpu{cpu}");
    let line = stat.lines().find(|line| line.split_whitespace().next() == Some(name.as_str()))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>().ok()?;
    let field = |index: usize| fields.get(index).copied().unwrap_or(0);
    Some(field(0) + field(1) + field(2) + field(7))
}

/// `, other processes used N% of the gateways' CPU` when that is worth saying.
fn describe_others(others_percent: Option<f64>) -> String {
    match others_percent {
        Some(percent) if percent >= NOISY_PERCENT => {
            format!(" (other processes used {percent:.0}% of the gateways' CPU meanwhile)")
        }
        _ => String::new(),
    }
}

/// The gateway replicas of one run and the Redis they share.
struct Replicas {
    gateways: Vec<Gateway>,
    redis: Option<ChildGuard>,
}

impl Replicas {
    /// Starts Redis (with several replicas) and the replicas, each ready.
    async fn start(
        args: &BenchArgs,
        tools: &Tools,
        pinning: Pinning,
        engines: &Engines,
        count: usize,
        run_dir: &Path,
        client: &Client,
    ) -> Result<Self> {
        let pods = engines.ports.len();
        // Filled as they start: on an error, dropping it stops what already runs.
        let mut started = Self { gateways: Vec::new(), redis: None };
        let mut extra_args: Vec<OsString> = Vec::new();
        if count > 1 {
            let program = tools.redis.as_deref().ok_or_else(|| anyhow!("redis-server was not found"))?;
            let (redis, port) = start_redis(program, run_dir, pinning.others).await?;
            started.redis = Some(redis);
            extra_args.extend(["--redis-url".into(), format!("redis://127.0.0.1:{port}/").into()]);
        }
        extra_args.extend(args.fleet.gateway_args.iter().map(OsString::from));
        for index in 0..count {
            let log = run_dir.join(format!("gateway-{pods}-pods-{count}-replicas-{index}.log"));
            let gateway = start_replica(tools, pinning, &engines.pods_file, log, extra_args.clone(), client)
                .await
                .with_context(|| format!("starting replica {index}"))?;
            ui::info(format!("replica {index} on {} (admin {})", gateway.listen, gateway.admin));
            started.gateways.push(gateway);
        }
        Ok(started)
    }

    /// Polls every replica's `/metrics` until each reports an age for all `pods` (it has
    /// scraped each once), bounded; how many pods the least advanced replica still lacked.
    async fn wait_all_scraped(&mut self, client: &Client, pods: usize) -> Result<usize> {
        let deadline = Instant::now() + ALL_SCRAPED_TIMEOUT;
        loop {
            self.check_children()?;
            let mut lacking = 0;
            for gateway in &self.gateways {
                let scraped = match client.get(gateway.admin, "/metrics", ADMIN_TIMEOUT).await {
                    Ok(reply) if reply.status.is_success() => pod_metric_ages(&reply.text()).len(),
                    // A replica too busy to answer in time counts as not there yet.
                    _ => 0,
                };
                lacking = lacking.max(pods.saturating_sub(scraped));
            }
            if lacking == 0 || Instant::now() >= deadline {
                return Ok(lacking);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Reads every replica's metrics ages [`AGE_READINGS`] times.
    async fn read_ages(&self, client: &Client, pods: usize) -> Result<Ages> {
        let mut seconds = Vec::new();
        let mut unscraped = 0;
        for reading in 0..AGE_READINGS {
            if reading > 0 {
                tokio::time::sleep(AGE_READING_INTERVAL).await;
            }
            for gateway in &self.gateways {
                let reply = client.get(gateway.admin, "/metrics", ADMIN_TIMEOUT).await.context("reading /metrics")?;
                let ages = pod_metric_ages(&reply.text());
                unscraped = unscraped.max(pods.saturating_sub(ages.len()));
                seconds.extend(ages);
            }
        }
        seconds.sort_unstable_by(f64::total_cmp);
        Ok(Ages { seconds, unscraped })
    }

    /// An error naming the first child that has exited (a replica, Redis).
    fn check_children(&mut self) -> Result<()> {
        let gateways = self.gateways.iter_mut().map(|gateway| &mut gateway.child);
        for child in gateways.chain(self.redis.as_mut()) {
            if let Some(status) = child.exited() {
                bail!("{} exited ({status}); log {}:\n{}", child.name(), child.log().display(), child.log_tail(20));
            }
        }
        Ok(())
    }

    /// [`Self::check_children`], nginx included.
    fn check_alive(&mut self, engines: &mut Engines) -> Result<()> {
        engines.check_alive()?;
        self.check_children()
    }

    /// Stops the replicas, then Redis.
    async fn stop(self) -> Result<()> {
        let Self { gateways, redis } = self;
        for (index, gateway) in gateways.into_iter().enumerate() {
            let outcome = gateway.child.stop(STOP_GRACE).await.with_context(|| format!("stopping replica {index}"))?;
            ui::info(format!("replica {index}: {outcome}"));
        }
        if let Some(redis) = redis {
            let outcome = redis.stop(STOP_GRACE).await.context("stopping redis-server")?;
            ui::info(format!("redis-server: {outcome}"));
        }
        Ok(())
    }
}

/// Starts one gateway replica discovering the pods of `pods_file`, pinned where replicas run,
/// with `extra_args`; ready when it returns.
async fn start_replica(
    tools: &Tools,
    pinning: Pinning,
    pods_file: &Path,
    log: PathBuf,
    extra_args: Vec<OsString>,
    client: &Client,
) -> Result<Gateway> {
    // Per-request log lines would cost more than what is measured; RUST_LOG still wins.
    let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    stack::start_gateway(
        GatewaySpec {
            routing_algorithm: Some(STRATEGIES[0]),
            log_format: "json",
            // Userspace only: the bench measures scraping and routing, not kernel assist.
            env: vec![("RUST_LOG".into(), rust_log), ("TURNSTILE_EBPF".into(), "off".into())],
            cpu: pinning.gateway,
            extra_args,
            ..GatewaySpec::on_free_ports(&tools.binaries.gateway, pods_file, log)?
        },
        client,
    )
    .await
}

/// CPU per request of one replica at the smallest fleet and at the largest, measured in turns
/// on the largest fleet's engines: two replicas run at once, one discovering the first
/// `small` pods and one all of them, and each round measures one then the other, per
/// strategy, the other paused (SIGSTOP) meanwhile so it neither takes CPU nor cache from the
/// one measured. The growth is each round's ratio, so a slow spell of the machine (other
/// virtual machines on the host, which with a large fleet's working set matter more) weighs on
/// both sides of it; the per-size runs, minutes apart, cannot pair their rounds so.
struct Turns {
    small: usize,
    large: usize,
    /// Per strategy, each round's CPU µs/request: (small fleet, large fleet).
    strategies: Vec<(&'static str, Vec<(f64, f64)>)>,
    /// Requests the strategies could not score (routed by least-request instead) in the
    /// measured windows, both replicas together.
    fallbacks: u64,
    log_warnings: usize,
}

impl Turns {
    /// Each round's large ÷ small.
    fn ratios(rounds: &[(f64, f64)]) -> Vec<f64> {
        rounds.iter().filter(|(small, _)| *small > 0.0).map(|(small, large)| large / small).collect()
    }

    /// The median (the lower middle of an even count).
    fn median(mut values: Vec<f64>) -> Option<f64> {
        values.sort_by(f64::total_cmp);
        values.get(values.len().checked_sub(1)? / 2).copied()
    }
}

/// Longest wait for a replica resumed after a pause to renew its readings (with a large fleet
/// they are older than the cut-off by then).
const RENEW_TIMEOUT: Duration = Duration::from_secs(30);

/// `gateway`'s metrics page. Tried three times: a replica just resumed from a pause closes
/// the admin connections its idle timers ran out on meanwhile, and the client may reuse one.
async fn admin_metrics(client: &Client, gateway: &Gateway) -> Result<String> {
    let mut tries = 0;
    loop {
        tries += 1;
        match client.get(gateway.admin, "/metrics", ADMIN_TIMEOUT).await {
            Ok(reply) if reply.status.is_success() => return Ok(reply.text()),
            Ok(reply) if tries >= 3 => bail!("reading /metrics: {}", reply.status),
            Err(err) if tries >= 3 => return Err(err).context("reading /metrics"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The oldest of the pods' metrics ages `gateway` reports, seconds.
async fn oldest_reading(client: &Client, gateway: &Gateway) -> Result<f64> {
    Ok(pod_metric_ages(&admin_metrics(client, gateway).await?).into_iter().fold(0.0, f64::max))
}

/// Polls `gateway` until its oldest reading is at most `fresh` seconds old (bounded by
/// [`RENEW_TIMEOUT`]); whether it got there.
async fn wait_renewed(client: &Client, gateway: &Gateway, fresh: f64) -> Result<bool> {
    let deadline = Instant::now() + RENEW_TIMEOUT;
    loop {
        if oldest_reading(client, gateway).await? <= fresh {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Requests `gateway` routed by least-request because its strategy could not score them.
async fn fallbacks(client: &Client, gateway: &Gateway) -> Result<u64> {
    Ok(count_fallbacks(&admin_metrics(client, gateway).await?))
}

/// The sum of `aibrix_gateway_routing_fallbacks_total` over its series in a metrics page.
fn count_fallbacks(text: &str) -> u64 {
    text.lines()
        .filter(|line| line.starts_with("aibrix_gateway_routing_fallbacks_total"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A paused process, resumed when dropped.
struct Paused(rustix::process::Pid);

impl Paused {
    fn new(pid: u32) -> Result<Self> {
        let pid = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw).context("no such process id")?;
        rustix::process::kill_process(pid, rustix::process::Signal::STOP).context("pausing a replica")?;
        Ok(Self(pid))
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(self.0, rustix::process::Signal::CONT);
    }
}

/// [`Turns`] on running `engines` (the largest fleet): its first `small` pods, then all.
async fn measure_turns(
    args: &BenchArgs,
    tools: &Tools,
    pinning: Pinning,
    engines: &mut Engines,
    small: usize,
    run_dir: &Path,
    client: &Client,
) -> Result<Turns> {
    let large = engines.ports.len();
    let small_file = run_dir.join(format!("pods-{small}-of-{large}.yaml"));
    stack::write_pods(&small_file, &pod_specs(&engines.ports[..small.min(engines.ports.len())]))?;
    let extra_args: Vec<OsString> = args.fleet.gateway_args.iter().map(OsString::from).collect();
    let mut sides: Vec<(usize, Replicas)> = Vec::new();
    for (pods, file) in [(small, &small_file), (large, &engines.pods_file)] {
        let log = run_dir.join(format!("gateway-turns-{pods}-of-{large}-pods.log"));
        let gateway = start_replica(tools, pinning, file, log, extra_args.clone(), client)
            .await
            .with_context(|| format!("starting the {pods}-pod replica"))?;
        ui::info(format!("{pods}-pod replica on {} (admin {})", gateway.listen, gateway.admin));
        sides.push((pods, Replicas { gateways: vec![gateway], redis: None }));
    }
    for (pods, side) in &mut sides {
        let lacking = side.wait_all_scraped(client, *pods).await?;
        if lacking > 0 {
            bail!("the {pods}-pod replica had not scraped {lacking} pods after {}", ui::human(ALL_SCRAPED_TIMEOUT));
        }
    }
    tokio::time::sleep(SETTLE).await;
    let mut strategies: Vec<(&'static str, Vec<(f64, f64)>)> = STRATEGIES.iter().map(|s| (*s, Vec::new())).collect();
    let mut fallen_back = 0;
    for round in 1..=args.fleet.rounds {
        for (strategy, done) in &mut strategies {
            let mut figures = [0.0; 2];
            // How old the large fleet's readings are while it runs: what it must get back to
            // after its pause before it is measured (with a second of slack).
            let steady = oldest_reading(client, &sides[1].1.gateways[0]).await? + 1.0;
            for (turn, figure) in figures.iter_mut().enumerate() {
                stop::check()?;
                let (measured, other) = (&sides[turn].1.gateways[0], &sides[1 - turn].1.gateways[0]);
                let _paused = Paused::new(other.child.pid())?;
                if turn == 1 && !wait_renewed(client, measured, steady).await? {
                    ui::warn(format!(
                        "the {large}-pod replica had readings older than {steady:.1} s {} after its pause",
                        ui::human(RENEW_TIMEOUT)
                    ));
                }
                let fallbacks_before = fallbacks(client, measured).await?;
                let spec = strategy_load(args, measured.listen, strategy);
                let pids = [measured.child.pid()];
                let (report, cpu_us, _) =
                    measured_window(args, &spec, &pids, pinning, |used| used.first().copied().unwrap_or_default())
                        .await?;
                if report.errors > 0 || report.completed == 0 {
                    bail!(
                        "{} errors and {} answers through the {}-pod replica",
                        report.errors,
                        report.completed,
                        sides[turn].0
                    );
                }
                fallen_back += fallbacks(client, measured).await?.saturating_sub(fallbacks_before);
                *figure = cpu_us;
            }
            let [at_small, at_large] = figures;
            ui::info(format!(
                "{strategy} in turns (round {round} of {}): {small} pods {at_small:.1} µs/request, {large} pods \
                 {at_large:.1}, ratio {:.2}",
                args.fleet.rounds,
                at_large / at_small.max(f64::EPSILON)
            ));
            done.push((at_small, at_large));
        }
        for (_, side) in &mut sides {
            side.check_alive(engines)?;
        }
    }
    let logs: Vec<PathBuf> = sides.iter().map(|(_, side)| side.gateways[0].child.log().to_path_buf()).collect();
    for (_, side) in sides {
        side.stop().await?;
    }
    let log_warnings =
        logs.iter().map(|log| scan_log_warnings(&std::fs::read_to_string(log).unwrap_or_default()).0).sum();
    if log_warnings > 0 {
        ui::warn(format!("{log_warnings} warnings or errors in the logs of the replicas measured in turns"));
    }
    if fallen_back > 0 {
        ui::warn(format!("{fallen_back} requests fell back to least-request in the windows measured in turns"));
    }
    Ok(Turns { small, large, strategies, fallbacks: fallen_back, log_warnings })
}

/// A throwaway `redis-server` on a free loopback port, without persistence (as the limits
/// integration tests run it), answering PING; the guard and the port.
pub(super) async fn start_redis(program: &Path, run_dir: &Path, cpu: Option<usize>) -> Result<(ChildGuard, u16)> {
    let port = testkit::free_port().context("choosing a port for redis-server")?;
    let port_text = port.to_string();
    let args: Vec<OsString> = ["--port", &port_text, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        .into_iter()
        .chain(["--daemonize", "no", "--loglevel", "warning", "--dir"])
        .map(OsString::from)
        .chain([run_dir.as_os_str().to_owned()])
        .collect();
    let mut child = ChildGuard::spawn(ServerSpec {
        name: "redis-server".into(),
        program: program.to_path_buf(),
        args,
        log: run_dir.join("redis.log"),
        stdout: StdoutTo::Log,
        env: Vec::new(),
        env_remove: Vec::new(),
        cpu,
    })?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.exited() {
            bail!("redis-server exited at start ({status}); log {}:\n{}", child.log().display(), child.log_tail(10));
        }
        if redis_answers_ping(port).await {
            return Ok((child, port));
        }
        if started.elapsed() > START_TIMEOUT {
            bail!("redis-server on port {port} did not answer PING within {}", ui::human(START_TIMEOUT));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether Redis on `port` answers `PING` with `+PONG` within a second.
async fn redis_answers_ping(port: u16) -> bool {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"PING\r\n").await?;
        let mut answer = [0_u8; 7];
        stream.read_exact(&mut answer).await?;
        std::io::Result::Ok(answer.starts_with(b"+PONG"))
    };
    matches!(tokio::time::timeout(Duration::from_secs(1), exchange).await, Ok(Ok(true)))
}

/// How many file descriptors `pid` has open.
fn open_files(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd")).ok().map(Iterator::count)
}

/// Warning and error lines in a gateway's JSON log, and the first one's fields.
fn scan_log_warnings(log: &str) -> (usize, Option<String>) {
    let mut count = 0;
    let mut first = None;
    for line in log.lines() {
        let Ok(entry) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if !matches!(entry["level"].as_str(), Some("WARN" | "ERROR")) {
            continue;
        }
        count += 1;
        if first.is_none() {
            // The event without its timestamp: nested under `fields` or flattened.
            let mut shown = entry.get("fields").cloned().unwrap_or(entry);
            if let Some(event) = shown.as_object_mut() {
                event.remove("timestamp");
            }
            first = Some(shown.to_string().chars().take(300).collect());
        }
    }
    (count, first)
}

/// The model name of this machine's CPU.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == "model name").then(|| value.trim().to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// What the report's header says about the run.
struct Settings {
    revision: String,
    cpus: usize,
    cpu_model: String,
    pinning: String,
    nginx_version: String,
    full_page_bytes: usize,
    filtered_page_bytes: usize,
    gateway_args: Vec<String>,
    connections: usize,
    warmup_seconds: u64,
    seconds: u64,
    idle_seconds: u64,
    rounds: usize,
    open_files: u64,
}

fn render_markdown(
    settings: &Settings,
    runs: &[Run],
    baselines: &[Baseline],
    turns: Option<&std::result::Result<Turns, String>>,
) -> String {
    let Settings {
        revision,
        cpus,
        cpu_model,
        pinning,
        nginx_version,
        full_page_bytes,
        filtered_page_bytes,
        gateway_args,
        connections,
        warmup_seconds,
        seconds,
        idle_seconds,
        rounds,
        open_files,
    } = settings;
    let mut out = format!("# Turnstile fleet benchmark ({revision})\n\n");
    let extra = if gateway_args.is_empty() {
        "none".to_owned()
    } else {
        gateway_args.iter().map(|arg| format!("`{arg}`")).collect::<Vec<_>>().join(" ")
    };
    let _ = writeln!(
        out,
        "Machine: {cpus} CPUs, {cpu_model}; {pinning} (all replicas share CPU 0, so with 4 one replica \
         gets at most 25% of it); open files limit {open_files}.\n\n\
         Engines: one nginx {nginx_version} (one worker) listening on a loopback port per pod: `GET /metrics` \
         answers the vLLM-shaped page ({full_page_bytes} bytes), or with a `name[]` query the filtered page \
         ({filtered_page_bytes} bytes); `POST /v1/chat/completions` a canned answer.\n\n\
         Gateway: release build, default scrape settings, userspace only (`TURNSTILE_EBPF=off`), further \
         flags: {extra}; several replicas share one Redis (`--redis-url`).\n\n\
         Per row: every replica has scraped every pod, 3 s settle, then {idle_seconds} s without traffic: \
         **idle CPU** is each replica's utime + stime over that period in % of one core (mean over replicas), \
         **scrapes/s per engine** the `/metrics` requests nginx logged in that period, all replicas together, \
         per pod per second. Then **metrics age p99**: {AGE_READINGS} readings of \
         `{AGE_SERIES}` from every replica, p99 over pods, replicas and readings. Then per strategy \
         (`routing-strategy` header) {connections} keep-alive connections to replica 0, {warmup_seconds} s \
         warm-up + {seconds} s measured: req/s, p50/p99 latency and **CPU µs/request**, replica 0's CPU \
         over the measured period per completed request, its scraping included. Each strategy is measured \
         {rounds} times, the strategies taking turns; a row shows the round with the median CPU µs/request \
         (the JSON has every round's). CPU 0's busy time \
         (/proc/stat) less the replicas' is what other processes took from them; a run where that reached \
         {NOISY_PERCENT:.0}% is named below the table.\n\n\
         Baseline (`{NGINX_PROXY}`): per fleet size, once the replicas are gone, a second nginx \
         {nginx_version} as the reverse proxy in the gateway's place, in front of the same engine ports: a \
         master and one worker on CPU 0, `least_conn` (nginx's least-request) over a `server` per pod, an \
         upstream keep-alive pool of pods + {connections} connections, HTTP/1.1 upstream, no access log; the \
         same load without the header, {rounds} rounds in a row, the median shown. Its CPU µs/request is the \
         master's and the worker's utime + stime over the measured period per completed request.\n"
    );
    out.push_str(
        "| pods | replicas | idle CPU % per replica | scrapes/s per engine | metrics age p99 ms | strategy | req/s | CPU µs/request | p50 ms | p99 ms | errors |\n\
         |---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|\n",
    );
    let mut notes = Vec::new();
    // A fleet size's baseline row follows its 1-replica rows (or its last run without one).
    let after_run = |pods: usize| {
        runs.iter()
            .position(|run| run.pods == pods && run.replicas == 1)
            .or_else(|| runs.iter().rposition(|run| run.pods == pods))
    };
    for (index, run) in runs.iter().enumerate() {
        write_run(&mut out, &mut notes, run);
        for baseline in baselines.iter().filter(|baseline| after_run(baseline.pods) == Some(index)) {
            write_baseline(&mut out, &mut notes, baseline);
        }
    }
    for baseline in baselines.iter().filter(|baseline| after_run(baseline.pods).is_none()) {
        write_baseline(&mut out, &mut notes, baseline);
    }
    if !notes.is_empty() {
        out.push('\n');
        for note in notes {
            let _ = writeln!(out, "- {note}");
        }
    }
    let growth = CpuGrowth::new(runs, baselines);
    if let Some(base) = growth.base_pods {
        let _ = writeln!(
            out,
            "\nCPU per request as the fleet grows: each column's CPU µs/request ÷ its own figure at {base} pods \
             (the gateway's with 1 replica, next to the nginx proxy's).\n"
        );
        let columns = CpuGrowth::columns();
        let _ = writeln!(out, "| pods | {} |", columns.join(" | "));
        let _ = writeln!(out, "|---:|{}", "---:|".repeat(columns.len()));
        for (pods, ratios) in growth.ratios() {
            let cells: Vec<String> =
                ratios.iter().map(|ratio| ratio.map_or_else(|| "-".into(), |ratio| format!("{ratio:.2}"))).collect();
            let _ = writeln!(out, "| {pods} | {} |", cells.join(" | "));
        }
    }
    if let Some(turns) = turns {
        write_turns(&mut out, turns, *rounds);
    }
    let _ = write!(out, "\n```text\n{}\n```\n", ascii_chart(runs).trim_end());
    out
}

/// The growth measured in turns: per strategy, each size's median, each round's ratio and
/// their median.
fn write_turns(out: &mut String, turns: &std::result::Result<Turns, String>, rounds: usize) {
    let turns = match turns {
        Ok(turns) => turns,
        Err(reason) => {
            let _ = writeln!(out, "\nCPU per request growth in turns: not measured ({reason}).");
            return;
        }
    };
    let Turns { small, large, strategies, fallbacks, log_warnings } = turns;
    let _ = writeln!(
        out,
        "\nThe same growth measured in turns, one replica: on the {large}-pod engines, a replica discovering \
         the first {small} pods and one discovering all {large} run side by side, and each of {rounds} rounds \
         measures the {small}-pod one, then the {large}-pod one, per strategy (the same load, warm-up and \
         window as above), the other paused meanwhile (SIGSTOP: it takes no CPU and no cache); once resumed, \
         the {large}-pod one is measured when its readings are as fresh as before its pause. Each round's \
         ratio pairs two windows seconds apart, so a slow spell of the machine weighs on both sides of it. \
         Medians are the lower middle of an even count.\n"
    );
    let _ = writeln!(
        out,
        "| strategy | {small} pods, µs/request (median) | {large} pods, µs/request (median) | ratio per round | median ratio |\n\
         |---|---:|---:|---|---:|"
    );
    for (strategy, figures) in strategies {
        let ratios = Turns::ratios(figures);
        let per_round: Vec<String> = ratios.iter().map(|ratio| format!("{ratio:.2}")).collect();
        let median = |values: Vec<f64>| Turns::median(values).map_or_else(|| "-".into(), |v| format!("{v:.1}"));
        let _ = writeln!(
            out,
            "| {strategy} | {} | {} | {} | {} |",
            median(figures.iter().map(|(at_small, _)| *at_small).collect()),
            median(figures.iter().map(|(_, at_large)| *at_large).collect()),
            per_round.join(", "),
            Turns::median(ratios).map_or_else(|| "-".into(), |ratio| format!("{ratio:.2}")),
        );
    }
    if *fallbacks > 0 {
        let _ = writeln!(
            out,
            "\n- {fallbacks} requests in the measured windows could not be scored and went by least-request."
        );
    }
    if *log_warnings > 0 {
        let _ = writeln!(
            out,
            "\n- {log_warnings} warnings or errors in those two replicas' logs (a replica resumed from a pause \
             may log that a strategy fell back before its readings were renewed)."
        );
    }
}

/// A run's rows (one per strategy, or its failure), and its notes.
fn write_run(out: &mut String, notes: &mut Vec<String>, run: &Run) {
    let Run { pods, replicas, outcome } = run;
    let measured = match outcome {
        Ok(measured) => measured,
        Err(reason) => {
            let reason = reason.lines().next().unwrap_or_default().replace('|', "/");
            let _ = writeln!(out, "| {pods} | {replicas} | failed: {reason} | | | | | | | | |");
            return;
        }
    };
    let idle_cells = [
        format!("{:.1}", measured.idle.cpu_percent_mean()),
        format!("{:.1}", measured.idle.scrapes_per_engine_per_second(*pods)),
        format_ms(percentile(&measured.ages.seconds, 99.0).map(|seconds| seconds * 1000.0)),
    ];
    for (index, load) in measured.loads.iter().enumerate() {
        // The idle figures once per run, on its first strategy's row.
        let idle = if index == 0 { idle_cells.clone() } else { Default::default() };
        let cells: Vec<String> =
            [pods.to_string(), replicas.to_string()].into_iter().chain(idle).chain(load_cells(load)).collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    let others = std::iter::once(measured.idle.others_percent)
        .chain(measured.loads.iter().map(|load| load.others_percent))
        .flatten()
        .fold(0.0_f64, f64::max);
    if others >= NOISY_PERCENT {
        notes.push(format!(
            "{pods} pods × {replicas}: other processes used up to {others:.0}% of the gateways' CPU during its \
             measured periods; its numbers are noisy"
        ));
    }
    if measured.unscraped_at_start > 0 || measured.ages.unscraped > 0 {
        notes.push(format!(
            "{pods} pods × {replicas}: {} pods not yet scraped by a replica when the wait gave up, {} missing \
             from an age reading",
            measured.unscraped_at_start, measured.ages.unscraped
        ));
    }
    if measured.log_warnings > 0 {
        notes.push(format!(
            "{pods} pods × {replicas}: {} warnings or errors in the gateway logs, first: `{}`",
            measured.log_warnings,
            measured.first_warning.as_deref().unwrap_or("-").replace('`', "'")
        ));
    }
}

/// A fleet size's baseline row (no idle figures: nginx does not scrape), or its failure.
fn write_baseline(out: &mut String, notes: &mut Vec<String>, baseline: &Baseline) {
    let Baseline { pods, outcome } = baseline;
    match outcome {
        Ok(load) => {
            let _ = writeln!(out, "| {pods} | 1 |  |  |  | {} |", load_cells(load).join(" | "));
            if let Some(others) = load.others_percent.filter(|others| *others >= NOISY_PERCENT) {
                notes.push(format!(
                    "{pods} pods, {NGINX_PROXY}: other processes used {others:.0}% of its CPU during the measured \
                     period; its numbers are noisy"
                ));
            }
        }
        Err(reason) => {
            let reason = reason.lines().next().unwrap_or_default().replace('|', "/");
            let _ = writeln!(out, "| {pods} | 1 |  |  |  | {NGINX_PROXY}: failed: {reason} | | | | | |");
        }
    }
}

/// The load cells of a row: strategy, req/s, CPU µs/request, p50, p99, errors.
fn load_cells(load: &Load) -> [String; 6] {
    let Load { strategy, report, cpu_us, .. } = load;
    [
        (*strategy).to_owned(),
        format!("{:.0}", report.requests_per_second()),
        format!("{cpu_us:.1}"),
        format_ms(report.percentile_ms(50.0)),
        format_ms(report.percentile_ms(99.0)),
        report.errors.to_string(),
    ]
}

/// CPU µs/request per fleet size with 1 replica, per strategy, then the nginx proxy's, and the
/// smallest fleet's, which the report divides by.
struct CpuGrowth {
    base_pods: Option<usize>,
    base: Vec<Option<f64>>,
    /// Per fleet size in run order: the figure of each of [`Self::columns`].
    rows: Vec<(usize, Vec<Option<f64>>)>,
}

impl CpuGrowth {
    fn new(runs: &[Run], baselines: &[Baseline]) -> Self {
        let mut sizes: Vec<usize> = Vec::new();
        for pods in runs.iter().map(|run| run.pods).chain(baselines.iter().map(|baseline| baseline.pods)) {
            if !sizes.contains(&pods) {
                sizes.push(pods);
            }
        }
        let figures = |pods: usize| -> Vec<Option<f64>> {
            let loads = runs
                .iter()
                .find(|run| run.pods == pods && run.replicas == 1)
                .and_then(|run| run.outcome.as_ref().ok())
                .map_or(&[][..], |measured| measured.loads.as_slice());
            let nginx = baselines
                .iter()
                .find(|baseline| baseline.pods == pods)
                .and_then(|baseline| baseline.outcome.as_ref().ok())
                .map(|load| load.cpu_us);
            STRATEGIES
                .iter()
                .map(|strategy| loads.iter().find(|load| load.strategy == *strategy).map(|load| load.cpu_us))
                .chain([nginx])
                .collect()
        };
        let base_pods = sizes.iter().copied().min();
        let base = base_pods.map_or_else(|| vec![None; STRATEGIES.len() + 1], figures);
        let rows = sizes.into_iter().map(|pods| (pods, figures(pods))).collect();
        Self { base_pods, base, rows }
    }

    /// The column names: the strategies, then the nginx proxy.
    fn columns() -> Vec<&'static str> {
        STRATEGIES.into_iter().chain([NGINX_PROXY]).collect()
    }

    /// Per fleet size, each column's figure ÷ its smallest fleet's (None without both).
    fn ratios(&self) -> Vec<(usize, Vec<Option<f64>>)> {
        let divide = |value: &Option<f64>, base: &Option<f64>| match (value, base) {
            (Some(value), Some(base)) if *base > 0.0 => Some(value / base),
            _ => None,
        };
        self.rows
            .iter()
            .map(|(pods, figures)| (*pods, figures.iter().zip(&self.base).map(|(f, b)| divide(f, b)).collect()))
            .collect()
    }
}

/// One chart's value of a measured run (none: no bar).
type Metric = dyn Fn(&Measured) -> Option<f64>;

/// Two bar charts over the runs: idle CPU per replica (of 100%) and least-request CPU per
/// request (of the largest).
fn ascii_chart(runs: &[Run]) -> String {
    let measured: Vec<(String, &Measured)> = runs
        .iter()
        .filter_map(|run| {
            let measured = run.outcome.as_ref().ok()?;
            Some((format!("{:>5} pods × {}", run.pods, run.replicas), measured))
        })
        .collect();
    let mut out = String::new();
    let panels: [(&str, Box<Metric>, Option<f64>); 2] = [
        ("idle CPU per replica, % of one core", Box::new(|m: &Measured| Some(m.idle.cpu_percent_mean())), Some(100.0)),
        (
            "gateway CPU per request, µs (least-request, replica 0)",
            Box::new(|m: &Measured| m.loads.first().map(|load| load.cpu_us)),
            None,
        ),
    ];
    for (title, value, full_scale) in panels {
        let _ = writeln!(out, "{title}");
        let values: Vec<(&str, Option<f64>)> =
            measured.iter().map(|(label, measured)| (label.as_str(), value(measured))).collect();
        let largest = values.iter().filter_map(|(_, value)| *value).fold(0.0_f64, f64::max);
        let scale = full_scale.unwrap_or(largest).max(largest).max(f64::EPSILON);
        for (label, value) in values {
            let Some(value) = value else {
                let _ = writeln!(out, "{label} | -");
                continue;
            };
            let length = ((value / scale) * CHART_WIDTH as f64).round().clamp(0.0, CHART_WIDTH as f64) as usize;
            let _ = writeln!(out, "{label} |{:<width$}| {value:.1}", "█".repeat(length), width = CHART_WIDTH);
        }
        out.push('\n');
    }
    out
}

/// Every number of the run, for tools.
fn render_json(
    settings: &Settings,
    runs: &[Run],
    baselines: &[Baseline],
    turns: Option<&std::result::Result<Turns, String>>,
) -> Value {
    let growth = CpuGrowth::new(runs, baselines);
    let Settings {
        revision,
        cpus,
        cpu_model,
        pinning,
        nginx_version,
        full_page_bytes,
        filtered_page_bytes,
        gateway_args,
        connections,
        warmup_seconds,
        seconds,
        idle_seconds,
        rounds,
        open_files,
    } = settings;
    let runs: Vec<Value> = runs
        .iter()
        .map(|Run { pods, replicas, outcome }| match outcome {
            Err(reason) => json!({"pods": pods, "replicas": replicas, "error": reason}),
            Ok(measured) => {
                let Measured { ready_after, unscraped_at_start, idle, ages, loads, log_warnings, first_warning } =
                    measured;
                let loads: Vec<Value> = loads
                    .iter()
                    .map(|load| {
                        let mut row = load_json(&load.report);
                        row["strategy"] = json!(load.strategy);
                        row["replica0_cpu_us_per_request"] = json!(load.cpu_us);
                        row["rounds_cpu_us_per_request"] = json!(load.rounds_cpu_us);
                        row["others_on_gateway_cpu_percent"] = json!(load.others_percent);
                        row
                    })
                    .collect();
                json!({
                    "pods": pods,
                    "replicas": replicas,
                    "all_scraped_after_seconds": ready_after.as_secs_f64(),
                    "unscraped_at_start": unscraped_at_start,
                    "idle": {
                        "seconds": idle.elapsed.as_secs_f64(),
                        "cpu_percent_per_replica": idle.cpu_percent,
                        "cpu_percent_mean": idle.cpu_percent_mean(),
                        "others_on_gateway_cpu_percent": idle.others_percent,
                        "open_files_per_replica": idle.open_files,
                        "scrapes": idle.scrapes.total,
                        "scrapes_per_engine_per_second": idle.scrapes_per_engine_per_second(*pods),
                        "scrapes_per_pod_min": idle.scrapes.per_pod_min,
                        "scrapes_per_pod_max": idle.scrapes.per_pod_max,
                    },
                    "metrics_age": {
                        "samples": ages.seconds.len(),
                        "p50_seconds": percentile(&ages.seconds, 50.0),
                        "p99_seconds": percentile(&ages.seconds, 99.0),
                        "max_seconds": ages.seconds.last(),
                        "unscraped_in_a_reading": ages.unscraped,
                    },
                    "loads": loads,
                    "gateway_log_warnings": log_warnings,
                    "first_gateway_log_warning": first_warning,
                })
            }
        })
        .collect();
    let baselines: Vec<Value> = baselines
        .iter()
        .map(|Baseline { pods, outcome }| match outcome {
            Err(reason) => json!({"pods": pods, "error": reason}),
            Ok(Load { report, cpu_us, others_percent, rounds_cpu_us, .. }) => {
                let mut row = load_json(report);
                row["rounds_cpu_us_per_request"] = json!(rounds_cpu_us);
                row["pods"] = json!(pods);
                row["upstream_keepalive"] = json!(proxy_keepalive(*pods, *connections));
                row["cpu_us_per_request"] = json!(cpu_us);
                row["others_on_proxy_cpu_percent"] = json!(others_percent);
                row
            }
        })
        .collect();
    let columns = CpuGrowth::columns();
    let growth_rows: Vec<Value> = growth
        .ratios()
        .into_iter()
        .map(|(pods, ratios)| {
            let mut row = serde_json::Map::new();
            row.insert("pods".into(), json!(pods));
            for (column, ratio) in columns.iter().zip(ratios) {
                row.insert((*column).into(), json!(ratio));
            }
            Value::Object(row)
        })
        .collect();
    json!({
        "revision": revision,
        "machine": {"cpus": cpus, "cpu_model": cpu_model, "pinning": pinning, "open_files_limit": open_files},
        "settings": {
            "nginx_version": nginx_version,
            "full_page_bytes": full_page_bytes,
            "filtered_page_bytes": filtered_page_bytes,
            "gateway_args": gateway_args,
            "strategies": STRATEGIES,
            "connections": connections,
            "warmup_seconds": warmup_seconds,
            "seconds": seconds,
            "rounds": rounds,
            "idle_seconds": idle_seconds,
            "age_readings": AGE_READINGS,
        },
        "runs": runs,
        "nginx_proxy_baseline": baselines,
        "cpu_per_request_growth": {
            "relative_to_pods": growth.base_pods,
            "replicas": 1,
            "rows": growth_rows,
        },
        "cpu_per_request_growth_in_turns": turns.map(turns_json),
    })
}

/// [`Turns`] for tools: per strategy, each round's figures and ratio, and the median ratio.
fn turns_json(turns: &std::result::Result<Turns, String>) -> Value {
    let turns = match turns {
        Ok(turns) => turns,
        Err(reason) => return json!({"error": reason}),
    };
    let strategies: Vec<Value> = turns
        .strategies
        .iter()
        .map(|(strategy, figures)| {
            let rounds: Vec<Value> = figures
                .iter()
                .map(|(at_small, at_large)| {
                    json!({"small_cpu_us_per_request": at_small, "large_cpu_us_per_request": at_large})
                })
                .collect();
            json!({
                "strategy": strategy,
                "rounds": rounds,
                "ratios": Turns::ratios(figures),
                "median_ratio": Turns::median(Turns::ratios(figures)),
            })
        })
        .collect();
    json!({
        "small_pods": turns.small,
        "large_pods": turns.large,
        "replicas": 1,
        "strategies": strategies,
        "fallbacks_in_windows": turns.fallbacks,
        "log_warnings": turns.log_warnings,
    })
}

/// What a load run measured, as the JSON report has it.
fn load_json(report: &LoadReport) -> Value {
    json!({
        "completed": report.completed,
        "errors": report.errors,
        "first_error": report.first_error,
        "requests_per_second": report.requests_per_second(),
        "p50_ms": report.percentile_ms(50.0),
        "p90_ms": report.percentile_ms(90.0),
        "p99_ms": report.percentile_ms(99.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn nginx_listens_on_every_port_and_filters_on_name_queries() {
        let ports = [10_001, 10_002, 10_003];
        let config = NginxConfig {
            dir: Path::new("/tmp/fleet"),
            pages: Path::new("/repo/fixtures"),
            scrape_log: Path::new("/tmp/fleet/scrapes.log"),
            ports: &ports,
            connections: 5_000,
        };
        let conf = nginx_config(&config);
        assert_eq!(conf.matches("listen 127.0.0.1:").count(), 3, "{conf}");
        for port in ports {
            assert!(conf.contains(&format!("    listen 127.0.0.1:{port};\n")), "{conf}");
        }
        assert_eq!(conf.matches("server {").count(), 1, "one server block: {conf}");
        assert!(conf.contains("worker_processes 1;") && conf.contains("master_process off;"), "{conf}");
        assert!(conf.contains("worker_connections 5000;") && conf.contains("worker_rlimit_nofile 5064;"), "{conf}");
        assert!(
            conf.contains("\"~(^|&)name(%5B%5D|\\[\\])=\" vllm-metrics-filtered.prom;")
                && conf.contains("default vllm-metrics.prom;")
                && conf.contains("alias /repo/fixtures/$metrics_page;"),
            "{conf}"
        );
        assert!(conf.contains("log_format scrape '$msec $server_port';"), "{conf}");
        assert!(conf.contains("access_log /tmp/fleet/scrapes.log scrape buffer=64k flush=1s;"), "{conf}");
        assert!(conf.contains(&format!("return 200 '{CHAT_ANSWER}';")), "{conf}");
        // The canned answer sits in single quotes and must parse as a completion with usage.
        assert!(!CHAT_ANSWER.contains('\'') && !CHAT_ANSWER.contains('$'));
        let answer: Value = serde_json::from_str(CHAT_ANSWER).unwrap();
        assert_eq!(answer["usage"]["completion_tokens"], ANSWER_TOKENS);
        assert_eq!(answer["model"], MODEL);
    }

    #[test]
    fn nginx_proxy_balances_least_conn_over_every_pod_with_a_keepalive_pool() {
        let ports = [10_001, 10_002, 10_003];
        let keepalive = proxy_keepalive(ports.len(), 32);
        assert_eq!(keepalive, 35);
        let config = ProxyConfig {
            dir: Path::new("/tmp/fleet/proxy"),
            listen: "127.0.0.1:9000".parse().unwrap(),
            ports: &ports,
            keepalive,
            connections: proxy_connections(keepalive, 32),
        };
        let conf = nginx_proxy_config(&config);
        assert_eq!(conf.matches("server 127.0.0.1:").count(), 3, "{conf}");
        for port in ports {
            assert!(conf.contains(&format!("    server 127.0.0.1:{port};\n")), "{conf}");
        }
        assert_eq!(conf.matches("upstream engines {").count(), 1, "{conf}");
        assert!(conf.contains("    listen 127.0.0.1:9000;\n"), "{conf}");
        assert!(conf.contains("worker_processes 1;") && conf.contains("master_process on;"), "{conf}");
        // 35 idle + 2 × 32 (clients, in flight upstream) + 512 slack.
        assert!(conf.contains("worker_connections 611;") && conf.contains("worker_rlimit_nofile 675;"), "{conf}");
        // nginx wants the balancing method before `keepalive`, both inside the upstream block.
        let upstream = &conf[conf.find("upstream engines {").unwrap()..];
        let upstream = &upstream[..upstream.find("  }\n").unwrap()];
        let least_conn = upstream.find("    least_conn;\n").expect(&conf);
        let pool = upstream.find("    keepalive 35;\n").expect(&conf);
        assert!(least_conn < pool && upstream.contains("    keepalive_requests 1000000;\n"), "{conf}");
        assert!(
            conf.contains("proxy_pass http://engines;")
                && conf.contains("proxy_http_version 1.1;")
                && conf.contains("proxy_set_header Connection \"\";"),
            "{conf}"
        );
        assert!(conf.contains("access_log off;") && !conf.contains("access_log /"), "{conf}");
        assert!(conf.contains("pid /tmp/fleet/proxy/nginx.pid;"), "{conf}");
        assert!(conf.contains("proxy_temp_path /tmp/fleet/proxy/tmp/proxy;"), "{conf}");
        assert!(conf.trim_end().ends_with('}') && conf.matches('{').count() == conf.matches('}').count(), "{conf}");
    }

    #[test]
    fn scrapes_are_counted_per_port_inside_the_window() {
        let log = "1000.000 10001\n\
                   1000.500 10001\n\
                   1000.999 10002\n\
                   1001.000 10001\n\
                   999.999 10002\n\
                   garbage\n\
                   1000.2\n\
                   1000.3 notaport\n";
        let counts = count_scrapes(log, 1000.0, 1001.0);
        assert_eq!(counts, HashMap::from([(10_001, 2), (10_002, 1)]));
        let summary = summarize_scrapes(&counts, &[10_001, 10_002, 10_003]);
        assert_eq!(summary, ScrapeCount { total: 3, per_pod_min: 0, per_pod_max: 2 });
        assert_eq!(summarize_scrapes(&HashMap::new(), &[]), ScrapeCount { total: 0, per_pod_min: 0, per_pod_max: 0 });
    }

    #[test]
    fn ages_come_from_the_age_series_only() {
        let text = "# HELP aibrix_gateway_pod_metrics_age_seconds Time since.\n\
                    # TYPE aibrix_gateway_pod_metrics_age_seconds gauge\n\
                    aibrix_gateway_pod_metrics_age_seconds{model=\"m\",pod=\"default/pod-0000\"} 0.05\n\
                    aibrix_gateway_pod_metrics_age_seconds{model=\"m\",pod=\"default/a}b\"} 1.5e-2\n\
                    aibrix_gateway_pod_metrics_age_seconds_other{model=\"m\"} 9\n\
                    aibrix_gateway_requests_total{model=\"m\"} 7\n";
        assert_eq!(pod_metric_ages(text), vec![0.05, 0.015]);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&samples, 99.0), Some(198.0));
        assert_eq!(percentile(&samples, 50.0), Some(100.0));
        assert_eq!(percentile(&samples, 100.0), Some(200.0));
        assert_eq!(percentile(&[0.05], 99.0), Some(0.05));
        assert_eq!(percentile(&[], 99.0), None);
    }

    #[test]
    fn cpu_busy_ticks_leave_out_idle_iowait_and_interrupts() {
        let stat = "cpu  100 1 50 9000 20 3 4 5 0 0\n\
                    cpu0 10 1 5 900 2 3 4 5 7 0\n\
                    cpu1 90 0 45 8100 18 0 0 0 0 0\n\
                    intr 12345\n";
        assert_eq!(parse_cpu_busy_ticks(stat, 0), Some(10 + 1 + 5 + 5));
        assert_eq!(parse_cpu_busy_ticks(stat, 1), Some(135));
        assert_eq!(parse_cpu_busy_ticks(stat, 2), None);
        assert!(cpu_busy_time(0).is_some(), "this machine has a CPU 0");
        let cpu = CpuUse {
            elapsed: Duration::from_secs(2),
            per_process: vec![Duration::from_millis(300), Duration::from_millis(100)],
            cpu_busy: Some(Duration::from_millis(1_000)),
        };
        assert_eq!(cpu.percent(cpu.per_process[0]), 15.0);
        assert_eq!(cpu.others_percent(), Some(30.0));
        assert_eq!(describe_others(Some(2.0)), "");
        assert!(describe_others(Some(30.0)).contains("30%"));
    }

    #[test]
    fn log_warnings_are_counted_with_the_first_message() {
        let log = "{\"level\":\"INFO\",\"fields\":{\"message\":\"listening\"}}\n\
                   not json\n\
                   {\"level\":\"WARN\",\"fields\":{\"message\":\"engine metrics scrape failed\",\"pod\":\"default/pod-0001\"}}\n\
                   {\"level\":\"ERROR\",\"fields\":{\"message\":\"later\"}}\n";
        let (count, first) = scan_log_warnings(log);
        assert_eq!(count, 2);
        let first = first.unwrap();
        assert!(first.contains("engine metrics scrape failed") && first.contains("pod-0001"), "{first}");
        assert_eq!(scan_log_warnings(""), (0, None));
        // The gateway's own JSON lines carry the event's fields flat, next to the timestamp.
        let flat = "{\"timestamp\":\"2026-01-01T00:00:00Z\",\"level\":\"WARN\",\"message\":\"routing strategy \
                    cannot score this request\",\"reason\":\"metrics_stale\"}\n";
        let (count, first) = scan_log_warnings(flat);
        let first = first.unwrap();
        assert_eq!(count, 1);
        assert!(first.contains("metrics_stale") && !first.contains("timestamp"), "{first}");
    }

    fn report(completed: u64, latencies_us: Vec<u32>) -> LoadReport {
        LoadReport { completed, errors: 1, first_error: None, latencies_us, measured: Duration::from_secs(5) }
    }

    fn measured(cpu_percent: Vec<f64>, scrapes: u64, cpu_us: f64) -> Measured {
        Measured {
            ready_after: Duration::from_secs(2),
            unscraped_at_start: 0,
            idle: Idle {
                elapsed: Duration::from_secs(5),
                cpu_percent,
                others_percent: Some(1.0),
                scrapes: ScrapeCount { total: scrapes, per_pod_min: 90, per_pod_max: 110 },
                open_files: vec![Some(120)],
            },
            ages: Ages { seconds: vec![0.01, 0.02, 0.06], unscraped: 0 },
            loads: vec![
                Load {
                    strategy: STRATEGIES[0],
                    report: report(50_000, vec![1000, 2000, 3000]),
                    cpu_us,
                    others_percent: None,
                    rounds_cpu_us: vec![cpu_us],
                },
                Load {
                    strategy: STRATEGIES[1],
                    report: report(40_000, vec![1500, 2500, 3500]),
                    cpu_us: cpu_us + 5.0,
                    others_percent: Some(cpu_us / 10.0),
                    rounds_cpu_us: vec![cpu_us + 5.0],
                },
            ],
            log_warnings: 0,
            first_warning: None,
        }
    }

    fn settings() -> Settings {
        Settings {
            revision: "abc1234".into(),
            cpus: 2,
            cpu_model: "Test CPU".into(),
            pinning: "gateway replicas pinned to CPU 0, nginx, Redis and load generator to CPU 1".into(),
            nginx_version: "1.22.1".into(),
            full_page_bytes: 44_000,
            filtered_page_bytes: 2_000,
            gateway_args: vec!["--pod-metric-max-scrapes-per-second=2000".into()],
            connections: 32,
            warmup_seconds: 2,
            seconds: 5,
            idle_seconds: 5,
            rounds: 3,
            open_files: 20_000,
        }
    }

    fn baseline(pods: usize, cpu_us: f64) -> Baseline {
        let load = Load {
            strategy: NGINX_PROXY,
            report: report(60_000, vec![800, 900, 1000]),
            cpu_us,
            others_percent: Some(cpu_us / 10.0),
            rounds_cpu_us: vec![cpu_us],
        };
        Baseline { pods, outcome: Ok(load) }
    }

    #[test]
    fn the_median_round_is_reported_with_every_round() {
        let round = |cpu_us: f64| Load {
            strategy: STRATEGIES[0],
            report: report(10_000, vec![1000]),
            cpu_us,
            others_percent: None,
            rounds_cpu_us: Vec::new(),
        };
        let median = Load::median(vec![round(61.0), round(40.0), round(44.0)]);
        assert_eq!(median.as_ref().map(|load| load.cpu_us), Some(44.0));
        assert_eq!(median.map(|load| load.rounds_cpu_us), Some(vec![61.0, 40.0, 44.0]));
        assert_eq!(Load::median(vec![round(50.0), round(30.0)]).map(|load| load.cpu_us), Some(30.0));
        assert!(Load::median(Vec::new()).is_none());
    }

    #[test]
    fn report_has_a_row_per_strategy_failures_and_a_chart() {
        let runs = vec![
            Run { pods: 2, replicas: 1, outcome: Ok(measured(vec![3.0], 200, 50.0)) },
            Run { pods: 100, replicas: 4, outcome: Ok(measured(vec![20.0, 30.0, 25.0, 25.0], 10_000, 600.0)) },
            Run { pods: 1000, replicas: 1, outcome: Err("nginx | died\nmore".into()) },
        ];
        let markdown = render_markdown(&settings(), &runs, &[], None);
        assert!(markdown.starts_with("# Turnstile fleet benchmark (abc1234)"), "{markdown}");
        assert!(markdown.contains("2 CPUs, Test CPU"), "{markdown}");
        assert!(markdown.contains("`--pod-metric-max-scrapes-per-second=2000`"), "{markdown}");
        assert!(
            markdown.contains("| 2 | 1 | 3.0 | 20.0 | 60.00 | least-request | 10000 | 50.0 | 2.00 | 3.00 | 1 |"),
            "{markdown}"
        );
        assert!(markdown.contains("| 2 | 1 |  |  |  | least-kv-cache | 8000 | 55.0 | 2.50 | 3.50 | 1 |"), "{markdown}");
        // 10,000 scrapes of 100 pods in 5 s; the mean of four replicas.
        assert!(markdown.contains("| 100 | 4 | 25.0 | 20.0 | 60.00 | least-request |"), "{markdown}");
        assert!(markdown.contains("| 1000 | 1 | failed: nginx / died | | | | | | | | |"), "{markdown}");
        // 600 µs/request: the second load saw 60% of CPU 0 used by others; 50 µs: 5%.
        assert!(markdown.contains("- 100 pods × 4: other processes used up to 60% of"), "{markdown}");
        assert!(markdown.contains("- 2 pods × 1: other processes used up to 5% of"), "{markdown}");
        assert!(markdown.contains("```text\nidle CPU per replica"), "{markdown}");
        assert!(markdown.contains(&format!("  100 pods × 4 |{:<40}| 25.0", "█".repeat(10))), "{markdown}");
        assert!(markdown.contains(&format!("  100 pods × 4 |{}| 600.0", "█".repeat(40))), "{markdown}");

        let json = render_json(&settings(), &runs, &[], None);
        assert_eq!(json["runs"][1]["idle"]["scrapes_per_engine_per_second"], 20.0);
        assert_eq!(json["runs"][1]["idle"]["cpu_percent_per_replica"].as_array().unwrap().len(), 4);
        assert_eq!(json["runs"][0]["loads"][1]["strategy"], "least-kv-cache");
        assert_eq!(json["runs"][2]["error"], "nginx | died\nmore");
    }

    #[test]
    fn nginx_baseline_rows_follow_the_one_replica_rows_and_grow_from_the_smallest_fleet() {
        let runs = vec![
            Run { pods: 2, replicas: 1, outcome: Ok(measured(vec![3.0], 200, 50.0)) },
            Run { pods: 2, replicas: 4, outcome: Ok(measured(vec![3.0; 4], 800, 70.0)) },
            Run { pods: 1000, replicas: 1, outcome: Ok(measured(vec![10.0], 100_000, 75.0)) },
            Run { pods: 1000, replicas: 4, outcome: Ok(measured(vec![10.0; 4], 400_000, 90.0)) },
        ];
        let baselines = vec![baseline(2, 20.0), baseline(1000, 25.0)];
        let markdown = render_markdown(&settings(), &runs, &baselines, None);
        assert!(markdown.contains("Baseline (`nginx proxy (baseline)`)"), "{markdown}");
        // 60,000 requests in 5 s; others at 2% (no note), 2.5%.
        let nginx_2 = "| 2 | 1 |  |  |  | nginx proxy (baseline) | 12000 | 20.0 | 0.90 | 1.00 | 1 |";
        let (two_pods_one, two_pods_four) =
            (markdown.find("| 2 | 1 |  |  |  | least-kv-cache |").unwrap(), markdown.find("| 2 | 4 | 3.0 |").unwrap());
        let nginx_row = markdown.find(nginx_2).expect(&markdown);
        assert!(two_pods_one < nginx_row && nginx_row < two_pods_four, "{markdown}");
        let nginx_1000 = markdown.find("| 1000 | 1 |  |  |  | nginx proxy (baseline) | 12000 | 25.0 |").unwrap();
        assert!(markdown.find("| 1000 | 4 | 10.0 |").unwrap() > nginx_1000, "{markdown}");
        assert!(!markdown.contains("nginx proxy (baseline): other processes"), "{markdown}");
        // Gateway 50 → 75 (least-request), 55 → 80 (least-kv-cache); nginx 20 → 25.
        assert!(markdown.contains("÷ its own figure at 2 pods"), "{markdown}");
        assert!(
            markdown.contains(
                "| pods | least-request | least-kv-cache | nginx proxy (baseline) |\n|---:|---:|---:|---:|\n"
            ),
            "{markdown}"
        );
        assert!(markdown.contains("| 2 | 1.00 | 1.00 | 1.00 |\n| 1000 | 1.50 | 1.45 | 1.25 |\n"), "{markdown}");

        let json = render_json(&settings(), &runs, &baselines, None);
        assert_eq!(json["nginx_proxy_baseline"][1]["pods"], 1000);
        assert_eq!(json["nginx_proxy_baseline"][1]["cpu_us_per_request"], 25.0);
        assert_eq!(json["nginx_proxy_baseline"][1]["upstream_keepalive"], 1032);
        assert_eq!(json["cpu_per_request_growth"]["relative_to_pods"], 2);
        assert_eq!(json["cpu_per_request_growth"]["rows"][1]["least-request"], 1.5);
        assert_eq!(json["cpu_per_request_growth"]["rows"][1]["nginx proxy (baseline)"], 1.25);

        // A failed baseline, and a fleet size measured with 4 replicas only: no ratio there.
        let runs = vec![
            Run { pods: 2, replicas: 1, outcome: Ok(measured(vec![3.0], 200, 50.0)) },
            Run { pods: 100, replicas: 4, outcome: Ok(measured(vec![3.0; 4], 800, 70.0)) },
        ];
        let baselines = vec![baseline(2, 20.0), Baseline { pods: 100, outcome: Err("no | worker\nmore".into()) }];
        let markdown = render_markdown(&settings(), &runs, &baselines, None);
        assert!(
            markdown.contains("| 100 | 1 |  |  |  | nginx proxy (baseline): failed: no / worker | | | | | |"),
            "{markdown}"
        );
        assert!(markdown.contains("| 100 | - | - | - |"), "{markdown}");
        assert_eq!(
            render_json(&settings(), &runs, &baselines, None)["nginx_proxy_baseline"][1]["error"],
            "no | worker\nmore"
        );
    }

    #[test]
    fn growth_in_turns_pairs_each_rounds_figures() {
        let runs = vec![Run { pods: 2, replicas: 1, outcome: Ok(measured(vec![3.0], 200, 50.0)) }];
        let turns = Ok(Turns {
            small: 2,
            large: 1000,
            strategies: vec![
                // A slow spell in round 2 lifts both sides: its ratio stays.
                ("least-request", vec![(20.0, 24.0), (30.0, 36.6), (21.0, 25.2)]),
                ("least-kv-cache", vec![(20.0, 26.0), (21.0, 27.3)]),
            ],
            fallbacks: 5,
            log_warnings: 3,
        });
        let markdown = render_markdown(&settings(), &runs, &[], Some(&turns));
        assert!(markdown.contains("the first 2 pods and one discovering all 1000"), "{markdown}");
        assert!(markdown.contains("| least-request | 21.0 | 25.2 | 1.20, 1.22, 1.20 | 1.20 |"), "{markdown}");
        assert!(markdown.contains("| least-kv-cache | 20.0 | 26.0 | 1.30, 1.30 | 1.30 |"), "{markdown}");
        assert!(markdown.contains("- 3 warnings or errors in those two replicas' logs"), "{markdown}");
        assert!(markdown.contains("- 5 requests in the measured windows could not be scored"), "{markdown}");
        let page = "# TYPE aibrix_gateway_routing_fallbacks counter\n\
                    aibrix_gateway_routing_fallbacks_total{strategy=\"least-kv-cache\",reason=\"metrics_stale\"} 3\n\
                    aibrix_gateway_routing_fallbacks_total{strategy=\"least-kv-cache\",reason=\"metrics_missing\"} 2\n\
                    aibrix_gateway_routing_fallbacks_created 1.7e9\n";
        assert_eq!(count_fallbacks(page), 5);
        let json = render_json(&settings(), &runs, &[], Some(&turns));
        let growth = &json["cpu_per_request_growth_in_turns"];
        assert_eq!(growth["large_pods"], 1000);
        assert_eq!(growth["strategies"][0]["rounds"][1]["large_cpu_us_per_request"], 36.6);
        assert_eq!(growth["strategies"][0]["median_ratio"], 1.2);

        let failed = Err("nginx | died".to_owned());
        let markdown = render_markdown(&settings(), &runs, &[], Some(&failed));
        assert!(markdown.contains("CPU per request growth in turns: not measured (nginx | died)."), "{markdown}");
        assert_eq!(
            render_json(&settings(), &runs, &[], Some(&failed))["cpu_per_request_growth_in_turns"]["error"],
            "nginx | died"
        );
        assert!(render_json(&settings(), &runs, &[], None)["cpu_per_request_growth_in_turns"].is_null());
    }

    #[derive(Debug, Parser)]
    struct Command {
        #[command(flatten)]
        bench: BenchArgs,
    }

    #[test]
    fn options_default_to_the_issue_and_pass_gateway_flags_through() {
        let parsed = Command::parse_from(["bench", "fleet"]);
        assert_eq!(parsed.bench.fleet.pods, vec![2, 100, 500, 1000]);
        assert_eq!(parsed.bench.fleet.replicas, vec![1, 4]);
        assert!(validate(&parsed.bench).is_ok());
        let parsed = Command::parse_from([
            "bench",
            "fleet",
            "--pods",
            "2,100",
            "--replicas=1",
            "--gateway-arg",
            "--pod-metric-refresh-interval-ms=100",
            "--gateway-arg=--pod-metric-timeout-ms=500",
        ]);
        assert_eq!(parsed.bench.fleet.pods, vec![2, 100]);
        assert_eq!(parsed.bench.fleet.replicas, vec![1]);
        assert_eq!(
            parsed.bench.fleet.gateway_args,
            vec!["--pod-metric-refresh-interval-ms=100", "--pod-metric-timeout-ms=500"]
        );
        let too_many = Command::parse_from(["bench", "fleet", "--pods", "2,100000"]);
        assert!(validate(&too_many.bench).is_err());
    }
}
