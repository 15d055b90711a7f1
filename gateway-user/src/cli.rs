//! Command line, configuration and process wiring. This is the only module
//! that knows about every other one.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::Admin;
use crate::discovery::{DiscoverySource, PodStore, pods_file};
use crate::metrics::Metrics;
use crate::proxy::forward::Upstream;
use crate::proxy::listener::{self, HttpLimits};
use crate::proxy::{Proxy, ProxySettings};

/// Turnstile: an AIBrix-compatible LLM inference gateway.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway: the OpenAI proxy listener and the admin listener.
    Serve(Box<ServeArgs>),
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Settings of `turnstile serve`. Every flag also reads an environment variable.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Proxy listener (OpenAI API, HTTP/1.1 and h2c).
    #[arg(long, env = "TURNSTILE_LISTEN", default_value = "0.0.0.0:8888")]
    pub listen: SocketAddr,

    /// Admin listener: /metrics, /healthz, /readyz, /v1/models, /debug/endpoints.
    #[arg(long, env = "TURNSTILE_ADMIN_LISTEN", default_value = "0.0.0.0:8080")]
    pub admin_listen: SocketAddr,

    /// Where pods come from: `file:PATH` (a Kubernetes v1 List of Pods, YAML
    /// or JSON, reloaded on change) or `kubernetes`.
    #[arg(long, env = "TURNSTILE_DISCOVERY", default_value = "file:/etc/turnstile/pods.yaml")]
    pub discovery: DiscoverySource,

    /// How often the pods file is checked for changes, in milliseconds.
    #[arg(long, env = "TURNSTILE_PODS_FILE_POLL_MS", default_value_t = 250)]
    pub pods_file_poll_ms: u64,

    /// Gateway default routing strategy, used when neither the model's config
    /// nor the request names one. Also read from ROUTING_ALGORITHM (AIBrix).
    /// [default: least-request]
    #[arg(long, env = "TURNSTILE_ROUTING_ALGORITHM")]
    pub routing_algorithm: Option<String>,

    /// Log line format.
    #[arg(long, env = "TURNSTILE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Largest accepted request body in bytes; larger bodies get 413.
    #[arg(long, env = "TURNSTILE_MAX_BODY_BYTES", default_value_t = 8 << 20)]
    pub max_body_bytes: usize,

    /// Time a client has to send the whole request body (408 after).
    #[arg(long, env = "TURNSTILE_BODY_READ_TIMEOUT_SECONDS", default_value_t = 30)]
    pub body_read_timeout_seconds: u64,

    /// Time a client has to send the request headers (connection closed after).
    #[arg(long, env = "TURNSTILE_HEADER_READ_TIMEOUT_SECONDS", default_value_t = 10)]
    pub header_read_timeout_seconds: u64,

    /// Most header fields in one request (431 above).
    #[arg(long, env = "TURNSTILE_MAX_HEADERS", default_value_t = 100)]
    pub max_headers: usize,

    /// Largest request line plus headers in bytes (414/431 above).
    #[arg(long, env = "TURNSTILE_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,

    /// Time to connect to an engine pod before trying another one.
    #[arg(long, env = "TURNSTILE_UPSTREAM_CONNECT_TIMEOUT_MS", default_value_t = 2000)]
    pub upstream_connect_timeout_ms: u64,

    /// Time an engine has to send response headers (504 after). Non-streaming
    /// answers only send headers when generation ends, so keep this above the
    /// longest generation you serve.
    #[arg(long, env = "TURNSTILE_UPSTREAM_TIMEOUT_SECONDS", default_value_t = 300)]
    pub upstream_timeout_seconds: u64,

    /// Pods tried for one request when connecting fails (nothing was sent yet).
    #[arg(long, env = "TURNSTILE_MAX_CONNECT_ATTEMPTS", default_value_t = 3)]
    pub max_connect_attempts: usize,

    /// On SIGTERM: how long in-flight requests may take to finish.
    #[arg(long, env = "TURNSTILE_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    pub shutdown_grace_seconds: u64,

    /// Tokio worker threads (0: one per CPU).
    #[arg(long, env = "TURNSTILE_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
}

impl ServeArgs {
    /// The default strategy: flag or TURNSTILE_ROUTING_ALGORITHM, else AIBrix's
    /// ROUTING_ALGORITHM, else `least-request`.
    fn default_strategy(&self) -> String {
        self.routing_algorithm
            .clone()
            .or_else(|| std::env::var("ROUTING_ALGORITHM").ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "least-request".to_owned())
    }
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
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(serve(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!("{err:#}");
                    eprintln!("turnstile: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TURNSTILE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
}

/// Runs the gateway until SIGTERM or SIGINT, then drains.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;

    let metrics = Arc::new(Metrics::new());
    let store = Arc::new(PodStore::new(Arc::clone(&metrics)));
    let shutdown = CancellationToken::new();
    let grace = Duration::from_secs(args.shutdown_grace_seconds);

    let settings = ProxySettings {
        default_strategy: args.default_strategy(),
        max_body_bytes: args.max_body_bytes,
        body_read_timeout: Duration::from_secs(args.body_read_timeout_seconds),
        max_connect_attempts: args.max_connect_attempts.max(1),
    };
    let upstream = Upstream::new(
        Duration::from_millis(args.upstream_connect_timeout_ms),
        Duration::from_secs(args.upstream_timeout_seconds),
    );
    let proxy = Arc::new(Proxy::new(Arc::clone(&store), Arc::clone(&metrics), upstream, settings.clone()));
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
        DiscoverySource::Kubernetes => {
            anyhow::bail!("--discovery kubernetes is not available in this build yet; use file:PATH")
        }
    }

    let proxy_listener =
        TcpListener::bind(args.listen).await.with_context(|| format!("binding proxy listener {}", args.listen))?;
    let admin_listener = TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding admin listener {}", args.admin_listen))?;
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
    };
    let admin = Arc::new(Admin::new(Arc::clone(&store), Arc::clone(&metrics)));
    let proxy_shutdown = CancellationToken::new();
    let proxy_task = tokio::spawn(listener::serve(
        "proxy",
        proxy_listener,
        limits,
        move |request, peer| Arc::clone(&proxy).handle(request, peer),
        proxy_shutdown.clone(),
        grace,
    ));
    let admin_for_handler = Arc::clone(&admin);
    let admin_task = tokio::spawn(listener::serve(
        "admin",
        admin_listener,
        HttpLimits::default(),
        move |request, _peer| Arc::clone(&admin_for_handler).handle(request),
        shutdown.clone(),
        Duration::from_secs(1),
    ));

    wait_for_signal().await;
    tracing::info!(grace_seconds = grace.as_secs(), "shutting down: readiness fails, no new connections, draining");
    admin.start_draining();
    proxy_shutdown.cancel();
    let _ = proxy_task.await;
    // The admin listener outlives the drain so probes see "draining" until the end.
    shutdown.cancel();
    let _ = admin_task.await;
    tracing::info!("stopped");
    Ok(())
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
    fn cli_is_consistent_and_documents_defaults() {
        Cli::command().debug_assert();
        let help = Cli::command().find_subcommand_mut("serve").expect("serve").render_long_help().to_string();
        for needle in ["0.0.0.0:8888", "0.0.0.0:8080", "TURNSTILE_LISTEN", "ROUTING_ALGORITHM", "least-request"] {
            assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
        }
    }

    #[test]
    fn defaults_match_the_contract() {
        let cli = Cli::try_parse_from(["turnstile", "serve"]).expect("parses");
        let Command::Serve(args) = cli.command;
        assert_eq!(args.listen.to_string(), "0.0.0.0:8888");
        assert_eq!(args.admin_listen.to_string(), "0.0.0.0:8080");
    }
}
