//! Command line, configuration and process wiring. This is the only module
//! that knows about every other one, and the only one that knows clap: the
//! flags ([`flags`], [`plan`]) become the plain config structs the domain
//! modules take, whose `Default`s are the flags' defaults.

/// A config struct built from the flags of the same names, each field named
/// once (the struct literal still has to name every field of the config).
macro_rules! same_fields {
    ($args:expr => $config:ident { $($field:ident),+ $(,)? }) => {
        $config { $($field: $args.$field),+ }
    };
    ($args:expr => $config:ident { $($field:ident),+ ; $($own:ident),+ $(,)? }) => {
        $config { $($field: $args.$field,)+ $($own),+ }
    };
}

mod flags;
mod plan;

/// A TensorRT-LLM machine id for this replica when none is set: from its
/// pod name (stable across restarts, distinct across most of a DaemonSet),
/// else at random. Two replicas with one id could make one
/// `disagg_request_id` in the same millisecond.
fn replica_machine_id() -> u16 {
    use std::hash::{Hash, Hasher};
    let (id, from) = match std::env::var("POD_NAME").ok().filter(|n| !n.is_empty()) {
        Some(name) => {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            name.hash(&mut hasher);
            ((hasher.finish() % 1024) as u16, "POD_NAME")
        }
        None => (rand::random_range(0..1024), "random"),
    };
    tracing::info!(machine_id = id, from, "TensorRT-LLM disagg_request_id machine id (set --trt-machine-id to choose)");
    id
}

/// How long a starting replica waits to read the other replicas' recent
/// routing decisions before serving.
const FLEET_CATCH_UP_LIMIT: Duration = Duration::from_secs(3);

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use flags::{EngineMetricsArgs, InspectArgs, KernelArgs, LimitArgs, RedisArgs, RoutingArgs, ServeArgs};
pub use plan::PlanArgs;

use crate::admin::Admin;
use crate::discovery::{DiscoverySource, PodStore, endpoints_file, kubernetes, pods_file};
use crate::metrics::Metrics;
use crate::proxy::listener::{self, HttpLimits};
use crate::proxy::upstream::{HttpUpstream, UpstreamSettings};
use crate::proxy::{Proxy, ProxyParts, ProxySettings};

/// `turnstile --version`: the release and the commit it was built from.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("TURNSTILE_GIT_REVISION"), ")");

/// Turnstile: an AIBrix-compatible LLM inference gateway.
#[derive(Parser, Debug)]
#[command(name = "turnstile", version = VERSION, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway: the OpenAI proxy listener and the admin listener.
    Serve(Box<ServeArgs>),
    /// Set and show per-user RPM/TPM limits (AIBrix records `aibrix-users/<name>` in Redis).
    Users(UsersArgs),
    /// Print kernel assist's pinned maps (per-model counters, penalties) as tables.
    Inspect(InspectArgs),
    /// Measure one replica's sustainable QPS through the gateway and print
    /// how many replicas a target load needs.
    Plan(Box<PlanArgs>),
    /// Print the routing strategies this build has, one name per line.
    Strategies,
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `turnstile users`.
#[derive(Args, Debug, Clone)]
pub struct UsersArgs {
    #[command(flatten)]
    pub redis: RedisArgs,

    #[command(subcommand)]
    pub action: UsersAction,
}

#[derive(Subcommand, Debug, Clone)]
pub enum UsersAction {
    /// Create or update a user; limits not given keep their stored value.
    Set {
        name: String,
        /// Requests per minute (0: the gateway's default).
        #[arg(long)]
        rpm: Option<i64>,
        /// Tokens per minute (0: the gateway's default).
        #[arg(long)]
        tpm: Option<i64>,
    },
    /// Print a user's record.
    Show { name: String },
    /// Print every user record, one JSON line each.
    List,
}

/// Runs `turnstile users`.
fn users_command(args: UsersArgs) -> anyhow::Result<()> {
    use crate::limits::users;
    args.redis.configure_link()?;
    let Some(url) = args.redis.url() else {
        anyhow::bail!("no Redis configured: pass --redis-url or set REDIS_HOST");
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        match args.action {
            UsersAction::Set { name, rpm, tpm } => {
                let record = users::set_user(&url, &name, rpm, tpm).await?;
                println!("{}", serde_json::to_string(&record)?);
            }
            UsersAction::Show { name } => match users::show_user(&url, &name).await? {
                Some(raw) => println!("{raw}"),
                None => anyhow::bail!("no user {name:?}"),
            },
            UsersAction::List => {
                for raw in users::list_users(&url).await? {
                    println!("{raw}");
                }
            }
        }
        Ok(())
    })
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            init_tracing(args.log_format);
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            if args.worker_threads > 0 {
                runtime.worker_threads(args.worker_threads);
            }
            let runtime = match runtime.enable_all().build() {
                Ok(rt) => rt,
                Err(err) => {
                    tracing::error!(error = %err, "cannot start the async runtime");
                    crate::logfmt::sink::flush(LOG_FLUSH_TIMEOUT);
                    return ExitCode::FAILURE;
                }
            };
            let code = match runtime.block_on(serve(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!("{err:#}");
                    crate::logfmt::sink::flush(LOG_FLUSH_TIMEOUT);
                    eprintln!("turnstile: {err:#}");
                    ExitCode::FAILURE
                }
            };
            // Tasks still running end with the runtime (bounded: a blocking
            // task must not hold the exit); then the log's last lines go out.
            runtime.shutdown_timeout(LOG_FLUSH_TIMEOUT);
            crate::logfmt::sink::flush(LOG_FLUSH_TIMEOUT);
            code
        }
        Command::Users(args) => match users_command(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("turnstile users: {err:#}");
                ExitCode::FAILURE
            }
        },
        Command::Inspect(args) => match crate::kernel::inspect::run(&args.bpffs_dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("turnstile inspect: {err:#}");
                ExitCode::FAILURE
            }
        },
        Command::Plan(args) => match crate::plan::run(&(*args).into()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("turnstile plan: {err:#}");
                ExitCode::FAILURE
            }
        },
        Command::Strategies => {
            for name in crate::routing::strategy_names() {
                println!("{name}");
            }
            ExitCode::SUCCESS
        }
    }
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // TURNSTILE_LOG first; RUST_LOG is honoured too because operators expect it.
    // The default leaves out kube's watcher warnings: it repeats a 403 on every
    // retry, where the pod and ModelAdapter watchers log their failures
    // themselves, rate-limited.
    let filter = EnvFilter::try_from_env("TURNSTILE_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,kube_runtime::watcher=error"));
    // Lines go through the log sink: a worker copies its line into memory and
    // one thread writes them out in batches. Without that thread, straight to stderr.
    let Some(sink) = crate::logfmt::sink::install() else {
        let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
        match format {
            LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
            LogFormat::Text => builder.with_ansi(false).fmt_fields(crate::logfmt::EscapedFields).init(),
        }
        tracing::warn!("cannot start the log writer thread; every line is written as it is logged");
        return;
    };
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(crate::logfmt::sink::LineWriter::new(sink));
    match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
        LogFormat::Text => builder.with_ansi(false).fmt_fields(crate::logfmt::EscapedFields).init(),
    }
    // A panic's own message goes straight to stderr: the lines before it go first.
    let panic_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        crate::logfmt::sink::flush(LOG_FLUSH_TIMEOUT);
        panic_hook(info);
    }));
}

/// Longest the log's last lines are waited for at exit (an output that does
/// not take them must not hold the process).
const LOG_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Raises the soft limit on open files to the hard one. Each pod takes a
/// kept-alive scrape connection and upstream connections, each client one:
/// a thousand pods alone pass the usual soft limit of 1,024.
fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_some() && limit.current != limit.maximum {
        let raised = rustix::process::Rlimit { current: limit.maximum, maximum: limit.maximum };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => tracing::info!(from = limit.current, to = limit.maximum, "open files limit raised"),
            Err(err) => tracing::warn!(error = %err, soft = limit.current, "cannot raise the open files limit"),
        }
    }
}

/// Runs the gateway until SIGTERM or SIGINT, then drains.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;

    raise_open_files_limit();
    args.limits.redis.configure_link()?;
    // Before anything starts: a users file or flags that do not go together stop the gateway here.
    let limits_config = args.limits.config()?;
    let trace_config = args.tracing.config().context("tracing")?;
    let metrics = Metrics::with_config(&crate::metrics::MetricsConfig::from_env(args.aibrix_metric_names))
        .with_log_lines(|| {
            let sink = crate::logfmt::sink::stats();
            crate::metrics::LogLines {
                written: sink.written_lines,
                dropped: sink.dropped_lines,
                pending_bytes: sink.pending_bytes,
            }
        });
    let metrics = Arc::new(metrics);
    let store = Arc::new(PodStore::new(Arc::clone(&metrics)));
    let shutdown = CancellationToken::new();
    let grace = Duration::from_secs(args.shutdown_grace_seconds);

    let upstream_settings = UpstreamSettings {
        connect_timeout: Duration::from_millis(args.upstream_connect_timeout_ms),
        response_timeout: Duration::from_secs(args.upstream_timeout_seconds),
        max_connections_per_pod: args.max_connections_per_pod.max(1),
        idle_timeout: Duration::from_secs(args.upstream_idle_timeout_seconds.max(1)),
    };
    let settings = ProxySettings {
        default_strategy: args.default_strategy(),
        max_body_bytes: args.max_body_bytes,
        body_read_timeout: Duration::from_secs(args.body_read_timeout_seconds),
        max_connect_attempts: args.max_connect_attempts.max(1),
        trusted_proxies: crate::proxy::client::TrustedProxies::new(args.trusted_proxy_cidrs.clone()),
        max_in_flight: args.max_in_flight.max(1),
        max_connections_per_pod: upstream_settings.max_connections_per_pod,
        upstream_timeout: upstream_settings.response_timeout,
        wake_sleeping_models: args.wake_sleeping_models,
        prefill_timeout: Duration::from_secs(args.routing.prefill_request_timeout_seconds.max(1)),
        trt_machine_id: args.routing.trt_machine_id.unwrap_or_else(replica_machine_id),
        count_prompt_tokens: if args.routing.prompt_length_bucketing {
            crate::proxy::offload::TokenCount::Exact
        } else if args.routing.prefill_score_policy == crate::routing::pd::PrefillPolicy::Conductor {
            crate::proxy::offload::TokenCount::Estimate
        } else {
            crate::proxy::offload::TokenCount::Skip
        },
    };
    // Kernel assist first: the upstream connector and the proxy tag sockets through it.
    let kernel = crate::kernel::KernelAssist::start(
        &(&args.kernel).into(),
        args.limits.redis.url(),
        &metrics,
        shutdown.clone(),
    )?;
    let upstream = HttpUpstream::new(&upstream_settings, Arc::clone(&kernel));
    let traces = crate::traces::Traces::start(&trace_config, metrics.traces.clone()).context("tracing")?;
    if let Some(endpoint) = &trace_config.endpoint {
        tracing::info!(
            endpoint,
            protocol = ?trace_config.protocol,
            sampling_ratio = trace_config.sampling_ratio,
            "request traces exported over OTLP"
        );
    }
    if let Some(why) = &trace_config.refused {
        tracing::error!(reason = why.as_str(), "request tracing is off");
    }
    tracing::info!(
        redis = limits_config.redis_url.as_deref().map(crate::limits::redis_store::redacted).as_deref(),
        failure_mode = ?limits_config.failure_mode,
        user_limits = ?limits_config.user_limits,
        users_in_file = limits_config.users.len(),
        auth = limits_config.bearer_token.is_some(),
        "limits configured"
    );
    let limits_redis_url = limits_config.redis_url.clone();
    let limits = Arc::new(crate::limits::Limits::new(limits_config, Arc::clone(&metrics))?);
    let admin_limits = Arc::clone(&limits);
    // Engine metrics of every ready pod, scraped once discovery runs.
    let scrape: crate::engine_metrics::ScrapeConfig = (&args.engine_metrics).into();
    let engine_metrics = Arc::new(crate::engine_metrics::EngineMetrics::new(scrape.stale_after));
    metrics.routing.report_pod_ages(Arc::clone(&engine_metrics) as Arc<dyn crate::metrics::PodAges>);
    let pod_in_flight: Arc<dyn crate::metrics::PodInFlight> = Arc::clone(&store) as _;
    metrics.report_pod_in_flight(Arc::downgrade(&pod_in_flight));
    let router = crate::routing::Router::new(&(&args.routing).into(), &metrics.routing);
    let fleet_state = Arc::clone(router.fleet_state());
    let slo_profiles = Arc::clone(&router.slo_state().profiles);
    let proxy = Arc::new(Proxy::new(ProxyParts {
        store: Arc::clone(&store),
        router,
        engine_metrics: Arc::clone(&engine_metrics),
        metrics: Arc::clone(&metrics),
        limits,
        upstream,
        kernel: Arc::clone(&kernel),
        traces: traces.clone(),
        settings: settings.clone(),
    }));
    crate::proxy::memory::spawn_trimmer(proxy.in_flight_counter(), shutdown.clone());
    proxy
        .check_strategy(&settings.default_strategy)
        .map_err(|e| anyhow::anyhow!("--routing-algorithm / ROUTING_ALGORITHM: {e}"))?;

    match &args.discovery {
        DiscoverySource::File(path) => {
            match pods_file::load_once(path, &store) {
                Ok(count) => tracing::info!(path = %path.display(), pods = count, "pods file loaded"),
                Err(err) => tracing::error!(error = %err, "pods file not usable yet; not ready until it is"),
            }
            let poll = Duration::from_millis(args.pods_file_poll_ms.max(10));
            tokio::spawn(pods_file::watch(path.clone(), Arc::clone(&store), poll, shutdown.clone()));
        }
        DiscoverySource::Endpoints(path) => {
            match endpoints_file::load_once(path, &store).await {
                Ok(count) => tracing::info!(path = %path.display(), endpoints = count, "endpoints file loaded"),
                Err(err) => tracing::error!(error = %err, "endpoints file not usable yet; not ready until it is"),
            }
            let poll = Duration::from_millis(args.pods_file_poll_ms.max(10));
            tokio::spawn(endpoints_file::watch(path.clone(), Arc::clone(&store), poll, shutdown.clone()));
        }
        DiscoverySource::Kubernetes => {
            let (store, metrics) = (Arc::clone(&store), Arc::clone(&metrics));
            kubernetes::spawn(args.namespace.clone(), store, metrics, shutdown.clone())
                .await
                .context("--discovery kubernetes")?;
        }
    }

    let sharing = match (&limits_redis_url, args.engine_metrics.pod_metric_sharing) {
        (Some(url), crate::cli::flags::MetricSharing::On) => {
            match crate::engine_metrics::sharing::Sharing::start(url, shutdown.clone()) {
                Ok(sharing) => Some(sharing),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot share engine scrapes through Redis; each replica scrapes every pod");
                    None
                }
            }
        }
        _ => None,
    };
    crate::engine_metrics::served_models::spawn(
        Arc::clone(&store),
        args.engine_metrics.adapter_reads(),
        shutdown.clone(),
    );
    crate::engine_metrics::scraper::spawn(
        Arc::clone(&store),
        Arc::clone(&engine_metrics),
        Arc::clone(&metrics),
        scrape,
        sharing,
        shutdown.clone(),
    );

    // The slo* strategies' GPU profiles, read in the background from the
    // Redis AIBrix's GPU optimizer writes them to; without Redis they have
    // none and route by least-request.
    if let Some(url) = &limits_redis_url
        && let Err(err) = crate::routing::gpu_profile::spawn_refresh(url, slo_profiles, shutdown.clone())
    {
        tracing::warn!(error = %err, "cannot read GPU profiles from Redis; slo strategies route by least-request");
    }

    let mut fleet_status = None;
    if let (Some(url), crate::cli::flags::MetricSharing::On) = (&limits_redis_url, args.routing.routing_state_sharing) {
        match crate::routing::fleet::spawn(url, &fleet_state, Arc::clone(&store), shutdown.clone()) {
            Ok((status, mut caught_up)) => {
                fleet_status = Some(status);
                // A replica that starts reads the others' recent decisions first, so
                // its first requests route as theirs would; a Redis that cannot say
                // within the limit leaves it to its own view.
                let waited = tokio::time::timeout(FLEET_CATCH_UP_LIMIT, caught_up.wait_for(|done| *done)).await;
                if waited.is_err() {
                    tracing::warn!(
                        "routing state: the other replicas' decisions not read in time; starting from this replica's own view"
                    );
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot share routing state through Redis; each replica routes on its own")
            }
        }
    }

    let proxy_listener =
        TcpListener::bind(args.listen).await.with_context(|| format!("binding proxy listener {}", args.listen))?;
    // Bound here, served by its own thread and runtime (below).
    let admin_listener = std::net::TcpListener::bind(args.admin_listen)
        .with_context(|| format!("binding admin listener {}", args.admin_listen))?;
    admin_listener.set_nonblocking(true)?;
    kernel.guard_port(proxy_listener.local_addr()?.port());
    tracing::info!(
        proxy = %proxy_listener.local_addr()?,
        admin = %admin_listener.local_addr()?,
        default_strategy = %settings.default_strategy,
        "turnstile serving"
    );

    let limits = HttpLimits {
        header_read_timeout: Duration::from_secs(args.header_read_timeout_seconds.max(1)),
        max_headers: args.max_headers,
        max_header_bytes: args.max_header_bytes,
        max_uri_bytes: args.max_uri_bytes,
        max_streams_per_connection: args
            .max_streams_per_connection
            .min(u32::try_from(args.max_in_flight).unwrap_or(u32::MAX))
            .max(1),
        client_write_timeout: (args.client_write_timeout_seconds > 0)
            .then(|| Duration::from_secs(args.client_write_timeout_seconds)),
    };
    let debug_access = crate::admin::DebugAccess {
        loopback: admin_listener.local_addr()?.ip().is_loopback(),
        token: crate::limits::BearerAuth::new(args.admin_token.as_deref()),
        refusals: crate::admin::RefusalLog::default(),
    };
    tracing::info!(debug = debug_access.describe(), "admin: /debug/*");
    let mut admin = Admin::new(Arc::clone(&store), Arc::clone(&metrics))
        .with_kernel(Arc::clone(&kernel))
        .with_limits(admin_limits)
        .with_debug_access(debug_access);
    if let Some(status) = fleet_status {
        admin = admin.with_detail("routing_state", Arc::new(move || status.readiness()));
    }
    let admin = Arc::new(admin);
    let proxy_shutdown = CancellationToken::new();
    let proxy_task = tokio::spawn(listener::serve_tracked(
        "proxy",
        proxy_listener,
        limits,
        move |request, peer| Arc::clone(&proxy).handle(request, peer),
        proxy_shutdown.clone(),
        grace,
        Some(kernel),
    ));
    let admin_task = spawn_admin(admin_listener, Arc::clone(&admin), shutdown.clone())?;

    wait_for_signal().await;
    tracing::info!(grace_seconds = grace.as_secs(), "shutting down: readiness fails, no new connections, draining");
    admin.start_draining();
    proxy_shutdown.cancel();
    let _ = proxy_task.await;
    // The admin listener outlives the drain so probes see "draining" until the end.
    shutdown.cancel();
    if let Some(traces) = traces {
        // The last requests' spans, within a bound: a collector that is down
        // does not hold the exit up.
        traces.shutdown(Duration::from_secs(2)).await;
    }
    let _ = tokio::task::spawn_blocking(move || admin_task.join()).await;
    tracing::info!("stopped");
    Ok(())
}

/// Serves the admin listener on a thread and runtime of its own, so
/// `/healthz`, `/readyz` and `/metrics` answer however busy the proxy's
/// workers are (a liveness probe that times out restarts the pod).
fn spawn_admin(
    listener: std::net::TcpListener,
    admin: Arc<Admin>,
    shutdown: CancellationToken,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let thread = std::thread::Builder::new().name("turnstile-admin".to_owned()).spawn(move || {
        runtime.block_on(async move {
            let listener = match TcpListener::from_std(listener) {
                Ok(listener) => listener,
                Err(err) => {
                    tracing::error!(error = %err, "admin listener unusable");
                    return;
                }
            };
            listener::serve(
                "admin",
                listener,
                HttpLimits::default(),
                move |request, _peer| Arc::clone(&admin).handle(request),
                shutdown,
                Duration::from_secs(1),
            )
            .await;
        });
    })?;
    Ok(thread)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn version_names_the_program_release_and_commit() {
        let version = Cli::command().render_version();
        let rest = version.trim_end().strip_prefix(&format!("turnstile {} (", env!("CARGO_PKG_VERSION")));
        let revision = rest.and_then(|r| r.strip_suffix(')')).unwrap_or_else(|| panic!("{version:?}"));
        assert!(
            revision == "unknown" || (revision.len() == 12 && revision.bytes().all(|b| b.is_ascii_hexdigit())),
            "{version:?}"
        );
    }

    #[test]
    fn cli_is_consistent_and_documents_defaults() {
        Cli::command().debug_assert();
        let help = Cli::command().find_subcommand_mut("serve").expect("serve").render_long_help().to_string();
        for needle in ["0.0.0.0:8888", "0.0.0.0:8080", "TURNSTILE_LISTEN", "ROUTING_ALGORITHM", "least-request"] {
            assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
        }
    }

    /// The README's configuration table lists every `serve` flag with its
    /// environment variable and default, as `--help` does.
    #[test]
    fn readme_configuration_table_matches_the_flags() {
        let readme = include_str!("../../README.md");
        let rows: Vec<&str> = readme.lines().filter(|l| l.starts_with("| `--")).collect();
        let mut serve = Cli::command();
        let serve = serve.find_subcommand_mut("serve").expect("serve");
        let mut missing = Vec::new();
        for arg in serve.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" {
                continue;
            }
            let env = arg.get_env().map_or(String::new(), |e| e.to_string_lossy().into_owned());
            let defaults: Vec<String> =
                arg.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
            let mut row = format!("| `--{long}` | `{env}` |");
            if !defaults.is_empty() {
                row.push_str(&format!(" `{}` |", defaults.join(",")));
            }
            if !rows.iter().any(|r| r.starts_with(&row)) {
                missing.push(row);
            }
        }
        assert!(missing.is_empty(), "README.md configuration rows missing or stale:\n{}", missing.join("\n"));
        let flags = serve.get_arguments().filter(|a| a.get_long().is_some_and(|l| l != "help")).count();
        assert_eq!(rows.len(), flags, "the table lists a flag `serve` does not have");
    }

    #[test]
    fn aibrix_metric_names_default_on_and_turn_off_with_false() {
        let parse = |extra: &[&str]| {
            let cli = Cli::try_parse_from(["turnstile", "serve"].iter().chain(extra)).expect("parses");
            let Command::Serve(args) = cli.command else { panic!("serve expected") };
            args.aibrix_metric_names
        };
        assert!(parse(&[]));
        assert!(parse(&["--aibrix-metric-names"]));
        assert!(parse(&["--aibrix-metric-names=true"]));
        assert!(!parse(&["--aibrix-metric-names=false"]));
    }

    #[test]
    fn defaults_match_the_contract() {
        let cli = Cli::try_parse_from(["turnstile", "serve"]).expect("parses");
        let Command::Serve(args) = cli.command else { panic!("serve expected") };
        assert_eq!(args.listen.to_string(), "0.0.0.0:8888");
        assert_eq!(args.admin_listen.to_string(), "0.0.0.0:8080");
        assert_eq!(args.limits.ratelimit_failure_mode, crate::limits::FailureMode::Open);
        assert_eq!(args.limits.redis_timeout_ms, 50);
        assert_eq!((args.limits.default_user_rpm, args.limits.default_user_tpm), (None, None));
        assert_eq!(args.routing.prefill_request_timeout_seconds, 30, "AIBRIX_PREFILL_REQUEST_TIMEOUT default");
    }

    /// Every default is written once, in the config it feeds: `serve` with
    /// no flags yields each domain's `Default`.
    #[test]
    fn parsed_defaults_are_the_configs_defaults() {
        let cli = Cli::try_parse_from(["turnstile", "serve"]).expect("parses");
        let Command::Serve(args) = cli.command else { panic!("serve expected") };
        assert_eq!(crate::routing::RoutingConfig::from(&args.routing), crate::routing::RoutingConfig::default());
        assert_eq!(crate::kernel::KernelConfig::from(&args.kernel), crate::kernel::KernelConfig::default());
        assert_eq!(
            crate::engine_metrics::ScrapeConfig::from(&args.engine_metrics),
            crate::engine_metrics::ScrapeConfig::default()
        );
        let limits = args.limits.config().expect("no users file");
        assert_eq!(limits, crate::limits::LimitsConfig { redis_url: limits.redis_url.clone(), ..Default::default() });

        let cli = Cli::try_parse_from(["turnstile", "plan", "--model", "m", "--target-qps", "100"]).expect("parses");
        let Command::Plan(args) = cli.command else { panic!("plan expected") };
        assert_eq!(
            crate::plan::PlanConfig::from(*args),
            crate::plan::PlanConfig { model: "m".into(), target_qps: 100.0, ..Default::default() }
        );
        let cli = Cli::try_parse_from(["turnstile", "inspect"]).expect("parses");
        let Command::Inspect(args) = cli.command else { panic!("inspect expected") };
        assert_eq!(args.bpffs_dir, crate::kernel::KernelConfig::default().bpffs_dir);
    }

    #[test]
    fn limit_flags_and_users_subcommand_parse() {
        let cli = Cli::try_parse_from([
            "turnstile",
            "serve",
            "--redis-url",
            "redis://127.0.0.1:6390/",
            "--ratelimit-failure-mode",
            "closed",
            "--default-user-rpm",
            "0",
            "--default-user-tpm",
            "1000",
        ])
        .expect("parses");
        let Command::Serve(args) = cli.command else { panic!("serve expected") };
        let config = args.limits.config().expect("config");
        assert_eq!(config.redis_url.as_deref(), Some("redis://127.0.0.1:6390/"));
        assert_eq!(config.failure_mode, crate::limits::FailureMode::Closed);
        assert_eq!(config.default_user, crate::limits::UserLimits { rpm: None, tpm: Some(1000) }, "0 is no limit");
        assert!(Cli::try_parse_from(["turnstile", "serve", "--ratelimit-failure-mode", "maybe"]).is_err());
        assert_eq!(config.user_limits, crate::limits::UserLimitsMode::Turnstile, "the default rules");

        let aibrix = |extra: &[&str]| {
            let cli = Cli::try_parse_from(["turnstile", "serve", "--user-limits", "aibrix"].iter().chain(extra))
                .expect("parses");
            let Command::Serve(args) = cli.command else { panic!("serve expected") };
            args.limits.config()
        };
        assert_eq!(aibrix(&[]).expect("config").user_limits, crate::limits::UserLimitsMode::Aibrix);
        let refused = aibrix(&["--default-user-rpm", "5"]).expect_err("AIBrix has no defaults for unknown users");
        assert!(refused.to_string().contains("--user-limits aibrix"), "{refused}");
        assert!(Cli::try_parse_from(["turnstile", "serve", "--user-limits", "openai"]).is_err());

        let cli = Cli::try_parse_from(["turnstile", "users", "set", "alice", "--rpm", "3"]).expect("parses");
        let Command::Users(UsersArgs { action: UsersAction::Set { name, rpm, tpm }, .. }) = cli.command else {
            panic!("users set expected")
        };
        assert_eq!((name.as_str(), rpm, tpm), ("alice", Some(3), None));
    }
}
