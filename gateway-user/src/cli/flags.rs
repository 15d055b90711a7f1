//! The flags of `turnstile serve` and `turnstile inspect`, and how they
//! become the plain config structs the domain modules take. Defaults are
//! not written here: each flag's default is read from the config it feeds
//! (its `Default`) or from a named constant of the module that owns it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::PossibleValue;
use clap::{Args, ValueEnum};

use super::LogFormat;
use crate::discovery::DiscoverySource;
use crate::engine_metrics::ScrapeConfig;
use crate::engine_metrics::served_models::AdapterReadConfig;
use crate::kernel::penalties::{Cidr, PenaltySettings};
use crate::kernel::{EbpfMode, KernelConfig, PenaltyMode};
use crate::limits::{LimitsConfig, UserLimits, UserLimitsMode};
use crate::proxy::defaults as proxy;
use crate::routing::pd::{DecodePolicy, KvConnector, PdSettings, PrefillPolicy};
use crate::routing::{PrefixTokenizer, RoutingConfig, VtcTimeUnit};
use crate::traces::TraceConfig;

/// Whole milliseconds of `duration`, for a flag counted in milliseconds.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
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

    /// Token that opens /debug/* (which lists every pod's address) on an
    /// admin listener not bound to loopback, sent as `Authorization: Bearer`.
    /// Without it, /debug/* is served only on a loopback admin listener;
    /// /metrics, /healthz and /readyz stay open for probes and Prometheus.
    #[arg(long, env = "TURNSTILE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Where pods come from: `file:PATH` (a Kubernetes v1 List of Pods, YAML
    /// or JSON, reloaded on change), `endpoints:PATH` (AIBrix's standalone
    /// endpoints file, reloaded on change) or `kubernetes`.
    #[arg(long, env = "TURNSTILE_DISCOVERY", default_value = "file:/etc/turnstile/pods.yaml")]
    pub discovery: DiscoverySource,

    /// How often the pods file is checked for changes, in milliseconds.
    #[arg(long, env = "TURNSTILE_PODS_FILE_POLL_MS", default_value_t = 250)]
    pub pods_file_poll_ms: u64,

    /// Namespace whose pods `--discovery kubernetes` watches.
    /// [default: all namespaces]
    #[arg(long, env = "TURNSTILE_NAMESPACE")]
    pub namespace: Option<String>,

    /// Gateway default routing strategy, used when neither the model's config
    /// nor the request names one. Also read from ROUTING_ALGORITHM (AIBrix).
    /// [default: least-request]
    #[arg(long, env = "TURNSTILE_ROUTING_ALGORITHM")]
    pub routing_algorithm: Option<String>,

    /// Log line format.
    #[arg(long, env = "TURNSTILE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Also export AIBrix's metric names on /metrics (`gateway_request_total`,
    /// `gateway_request_model_fail_total`, `gateway_prompt_token_bucket_total`,
    /// `aibrix_prefix_cache_routing_decisions_total`, `pd_selected_*_pod_total`, ...)
    /// so AIBrix dashboards and alerts keep working; `gateway_pod` is env
    /// POD_NAME. `--aibrix-metric-names=false` exports Turnstile's names only.
    #[arg(long, env = "TURNSTILE_AIBRIX_METRIC_NAMES", action = clap::ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true",
          default_value_t = crate::metrics::MetricsConfig::default().aibrix_names)]
    pub aibrix_metric_names: bool,

    /// Largest accepted request body in bytes; larger bodies get 413. For
    /// audio uploads: the most read before the form's `model` field (the
    /// upload itself streams through, any size).
    #[arg(long, env = "TURNSTILE_MAX_BODY_BYTES", default_value_t = proxy::MAX_BODY_BYTES)]
    pub max_body_bytes: usize,

    /// Time a client has to send the whole request body (408 after); for
    /// audio uploads, the time to reach the form's fields, and then the
    /// longest pause mid-upload.
    #[arg(long, env = "TURNSTILE_BODY_READ_TIMEOUT_SECONDS", default_value_t = proxy::BODY_READ_TIMEOUT_SECONDS)]
    pub body_read_timeout_seconds: u64,

    /// Time a client has to send the request headers (connection closed after).
    #[arg(long, env = "TURNSTILE_HEADER_READ_TIMEOUT_SECONDS", default_value_t = proxy::HEADER_READ_TIMEOUT_SECONDS)]
    pub header_read_timeout_seconds: u64,

    /// Most header fields in one request (431 above).
    #[arg(long, env = "TURNSTILE_MAX_HEADERS", default_value_t = proxy::MAX_HEADERS)]
    pub max_headers: usize,

    /// Largest request line plus headers in bytes (431 above; at least 8192).
    #[arg(long, env = "TURNSTILE_MAX_HEADER_BYTES", default_value_t = proxy::MAX_HEADER_BYTES)]
    pub max_header_bytes: usize,

    /// Longest request target (path and query) in bytes (414 above).
    #[arg(long, env = "TURNSTILE_MAX_URI_BYTES", default_value_t = proxy::MAX_URI_BYTES)]
    pub max_uri_bytes: usize,

    /// Time to connect to an engine pod before trying another one.
    #[arg(long, env = "TURNSTILE_UPSTREAM_CONNECT_TIMEOUT_MS", default_value_t = proxy::UPSTREAM_CONNECT_TIMEOUT_MS)]
    pub upstream_connect_timeout_ms: u64,

    /// Time an engine has to send response headers (504 after). Non-streaming
    /// answers only send headers when generation ends, so keep this above the
    /// longest generation you serve.
    #[arg(long, env = "TURNSTILE_UPSTREAM_TIMEOUT_SECONDS", default_value_t = proxy::UPSTREAM_TIMEOUT_SECONDS)]
    pub upstream_timeout_seconds: u64,

    /// Most connections to one engine pod (one per request in flight);
    /// requests past it wait for a free one, within the upstream timeout.
    #[arg(long, env = "TURNSTILE_MAX_CONNECTIONS_PER_POD", default_value_t = proxy::MAX_CONNECTIONS_PER_POD)]
    pub max_connections_per_pod: usize,

    /// Idle engine connections are closed after this.
    #[arg(long, env = "TURNSTILE_UPSTREAM_IDLE_TIMEOUT_SECONDS",
          default_value_t = proxy::UPSTREAM_IDLE_TIMEOUT_SECONDS)]
    pub upstream_idle_timeout_seconds: u64,

    /// Most requests in flight in the whole gateway; past it requests get
    /// 503 with Retry-After: 1 before their body is read.
    #[arg(long, env = "TURNSTILE_MAX_IN_FLIGHT", default_value_t = proxy::MAX_IN_FLIGHT)]
    pub max_in_flight: usize,

    /// Most concurrent HTTP/2 streams on one client connection (never more
    /// than --max-in-flight).
    #[arg(long, env = "TURNSTILE_MAX_STREAMS_PER_CONNECTION", default_value_t = proxy::MAX_STREAMS_PER_CONNECTION)]
    pub max_streams_per_connection: u32,

    /// A client that leaves an answer unread this long (full TCP window,
    /// zero HTTP/2 window) has its connection closed and the engine
    /// requests behind it cancelled; 0: never.
    #[arg(long, env = "TURNSTILE_CLIENT_WRITE_TIMEOUT_SECONDS", default_value_t = proxy::CLIENT_WRITE_TIMEOUT_SECONDS)]
    pub client_write_timeout_seconds: u64,

    /// Pods tried for one request when connecting fails (nothing was sent yet).
    #[arg(long, env = "TURNSTILE_MAX_CONNECT_ATTEMPTS", default_value_t = proxy::MAX_CONNECT_ATTEMPTS)]
    pub max_connect_attempts: usize,

    /// When every ready pod of a model sleeps (vLLM's sleep mode, read from
    /// `vllm:engine_sleep_state`), ask one to wake up (`POST /wake_up`, once
    /// per model) and answer 503 with Retry-After until it is awake; off: 503
    /// saying the model sleeps. Sleeping pods never get requests either way.
    #[arg(long, env = "TURNSTILE_WAKE_SLEEPING_MODELS", action = clap::ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false)]
    pub wake_sleeping_models: bool,

    /// On SIGTERM: how long in-flight requests may take to finish.
    #[arg(long, env = "TURNSTILE_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    pub shutdown_grace_seconds: u64,

    /// Tokio worker threads (0: one per CPU).
    #[arg(long, env = "TURNSTILE_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,

    /// Proxies (ingress controllers, load balancers) whose X-Forwarded-For
    /// or Forwarded header names the client, comma-separated CIDRs or
    /// addresses. For their requests the client used for penalties and logs
    /// is the rightmost forwarded hop that is not itself a trusted proxy;
    /// such clients are penalised with 429s only, never by refusing or
    /// closing the proxy's connections.
    #[arg(long, env = "TURNSTILE_TRUSTED_PROXY_CIDRS", value_delimiter = ',')]
    pub trusted_proxy_cidrs: Vec<Cidr>,

    #[command(flatten)]
    pub limits: LimitArgs,

    #[command(flatten)]
    pub kernel: KernelArgs,

    #[command(flatten)]
    pub engine_metrics: EngineMetricsArgs,

    #[command(flatten)]
    pub routing: RoutingArgs,

    #[command(flatten)]
    pub tracing: TraceArgs,
}

impl ServeArgs {
    /// The default strategy: flag or TURNSTILE_ROUTING_ALGORITHM, else AIBrix's
    /// ROUTING_ALGORITHM, else `least-request`.
    pub fn default_strategy(&self) -> String {
        self.routing_algorithm
            .clone()
            .or_else(|| std::env::var("ROUTING_ALGORITHM").ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "least-request".to_owned())
    }
}

/// What opens a PEM certificate.
const CERTIFICATE_PEM: &[u8] = b"-----BEGIN CERTIFICATE-----";

/// Where the shared rate-limit counters and user records live.
#[derive(Args, Debug, Clone)]
pub struct RedisArgs {
    /// Redis for rate-limit counters shared by all replicas and for user
    /// records, e.g. `redis://:PASSWORD@redis:6379/0`, or `rediss://` for
    /// TLS. A URL without credentials takes REDIS_USERNAME / REDIS_PASSWORD
    /// when set. When unset, AIBrix's REDIS_HOST / REDIS_PORT (default 6379) /
    /// REDIS_PASSWORD build it; without either, limits are counted per
    /// replica in process.
    #[arg(long, env = "TURNSTILE_REDIS_URL", hide_env_values = true, global = true)]
    pub redis_url: Option<String>,

    /// PEM file of the CA certificates a `rediss://` server's certificate
    /// must lead to (a private CA). [default: the system's roots]
    #[arg(long, env = "TURNSTILE_REDIS_CA_FILE", global = true)]
    pub redis_ca_file: Option<PathBuf>,
}

impl RedisArgs {
    /// Makes every Redis client of the process trust `--redis-ca-file` and
    /// use REDIS_USERNAME / REDIS_PASSWORD where the URL has no credentials.
    pub fn configure_link(&self) -> anyhow::Result<()> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let ca_pem = match &self.redis_ca_file {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| anyhow::anyhow!("reading --redis-ca-file {}: {e}", path.display()))?;
                if !pem.windows(CERTIFICATE_PEM.len()).any(|w| w == CERTIFICATE_PEM) {
                    anyhow::bail!("--redis-ca-file {} holds no PEM certificate", path.display());
                }
                Some(pem)
            }
        };
        crate::redis_link::configure(crate::redis_link::Settings {
            ca_pem,
            username: env("REDIS_USERNAME"),
            password: env("REDIS_PASSWORD"),
        });
        Ok(())
    }

    /// The Redis URL: flag or TURNSTILE_REDIS_URL, else built from REDIS_HOST.
    pub fn url(&self) -> Option<String> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        self.redis_url.clone().filter(|u| !u.trim().is_empty()).or_else(|| {
            let host = env("REDIS_HOST")?;
            Some(crate::limits::redis_store::url_from_parts(
                host.trim(),
                env("REDIS_PORT").as_deref(),
                env("REDIS_PASSWORD").as_deref(),
            ))
        })
    }
}

/// Model RPS caps, per-user limits and auth.
#[derive(Args, Debug, Clone)]
pub struct LimitArgs {
    #[command(flatten)]
    pub redis: RedisArgs,

    /// When Redis fails or is slow: `open` admits and enforces the limits per
    /// replica in process; `closed` answers 503.
    #[arg(long, env = "TURNSTILE_RATELIMIT_FAILURE_MODE", default_value_t = LimitsConfig::default().failure_mode)]
    pub ratelimit_failure_mode: crate::limits::FailureMode,

    /// Longest wait for one Redis call before it counts as failed.
    #[arg(long, env = "TURNSTILE_REDIS_TIMEOUT_MS",
          default_value_t = millis(LimitsConfig::default().redis_call_timeout))]
    pub redis_timeout_ms: u64,

    /// Consecutive Redis failures after which limit checks stop waiting on
    /// Redis (circuit open) until a probe succeeds.
    #[arg(long, env = "TURNSTILE_REDIS_BREAKER_FAILURES", default_value_t = LimitsConfig::default().breaker_failures)]
    pub redis_breaker_failures: u32,

    /// Time between probes of an unreachable Redis.
    #[arg(long, env = "TURNSTILE_REDIS_BREAKER_COOLDOWN_MS",
          default_value_t = millis(LimitsConfig::default().breaker_cool_down))]
    pub redis_breaker_cooldown_ms: u64,

    /// Users and their limits: a JSON or YAML list of {name, rpm, tpm}.
    /// Wins over records in Redis.
    #[arg(long, env = "TURNSTILE_USERS_FILE")]
    pub users_file: Option<PathBuf>,

    /// Requests per minute of a user (header `user`) with no record or no
    /// rpm in it. [default: no limit]
    #[arg(long, env = "TURNSTILE_DEFAULT_USER_RPM")]
    pub default_user_rpm: Option<u64>,

    /// Tokens per minute of a user with no record or no tpm in it.
    /// [default: no limit]
    #[arg(long, env = "TURNSTILE_DEFAULT_USER_TPM")]
    pub default_user_tpm: Option<u64>,

    /// Whose rules per-user RPM/TPM limits follow. The default, `turnstile`,
    /// is as README "Limits" describes; `aibrix` applies AIBrix's exactly
    /// (a user without a record is refused, rpm 0 is 100, tpm 0 is
    /// rpm × 1000, TPM users must ask for usage on streamed chats) and takes
    /// no --default-user-rpm/-tpm.
    #[arg(long, env = "TURNSTILE_USER_LIMITS", value_enum, default_value_t = LimitsConfig::default().user_limits)]
    pub user_limits: UserLimitsMode,

    /// Require `Authorization: Bearer <token>` on the proxy listener.
    #[arg(long, env = "AIBRIX_AUTH_BEARER_TOKEN", hide_env_values = true)]
    pub auth_bearer_token: Option<String>,
}

impl LimitArgs {
    /// The limiter configuration, with the users file read.
    pub fn config(&self) -> anyhow::Result<LimitsConfig> {
        let users = match &self.users_file {
            Some(path) => crate::limits::users::load_users_file(path)?,
            None => Vec::new(),
        };
        let positive = |n: Option<u64>| n.filter(|n| *n > 0);
        if self.user_limits == UserLimitsMode::Aibrix
            && (self.default_user_rpm.is_some() || self.default_user_tpm.is_some())
        {
            anyhow::bail!(
                "--default-user-rpm and --default-user-tpm do not apply with --user-limits aibrix: \
                 AIBrix refuses a user without a record and defaults a record's 0s to rpm 100, tpm rpm x 1000"
            );
        }
        Ok(LimitsConfig {
            redis_url: self.redis.url(),
            failure_mode: self.ratelimit_failure_mode,
            redis_call_timeout: Duration::from_millis(self.redis_timeout_ms.max(1)),
            breaker_failures: self.redis_breaker_failures,
            breaker_cool_down: Duration::from_millis(self.redis_breaker_cooldown_ms),
            users,
            default_user: UserLimits { rpm: positive(self.default_user_rpm), tpm: positive(self.default_user_tpm) },
            bearer_token: self.auth_bearer_token.clone(),
            user_limits: self.user_limits,
        })
    }
}

/// Kernel assist and client penalties.
#[derive(Args, Debug, Clone)]
pub struct KernelArgs {
    /// Kernel assist: `auto` loads the eBPF programs and falls back to
    /// userspace-only when loading or attaching fails (no CAP_BPF, verifier,
    /// no bpffs); `required` exits instead; `off` never loads them.
    #[arg(long, env = "TURNSTILE_EBPF", value_enum, default_value_t = KernelConfig::default().ebpf)]
    pub ebpf: EbpfMode,

    /// Directory on a bpffs where kernel maps and programs are pinned (a bpffs
    /// is mounted there when none is and the gateway runs as root). One
    /// directory per gateway process; its previous contents are replaced.
    #[arg(long, env = "TURNSTILE_BPFFS_DIR", default_value = crate::kernel::DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,

    /// Also pin the program links, so the programs stay attached after the
    /// gateway exits (by default they detach with the process).
    #[arg(long, env = "TURNSTILE_PIN_LINKS")]
    pub pin_links: bool,

    /// Gateway-made 429s to one client address within one
    /// --penalty-window-seconds window that mark it as flooding: it is then
    /// refused (new connections refused; behind a trusted proxy, answered
    /// 429) for the penalty time (0: never). Clients that honour Retry-After,
    /// or send up to 100 requests/s into a full limit, never get there.
    #[arg(long, env = "TURNSTILE_PENALTY_THRESHOLD", default_value_t = PenaltySettings::default().threshold)]
    pub penalty_threshold: u32,

    /// Length of the windows 429s are counted in, seconds.
    #[arg(long, env = "TURNSTILE_PENALTY_WINDOW_SECONDS",
          default_value_t = PenaltySettings::default().window.as_secs())]
    pub penalty_window_seconds: u64,

    /// How long a penalty lasts, in seconds past the end of the current
    /// rate-limit (RPS) window.
    #[arg(long, env = "TURNSTILE_PENALTY_SECONDS", default_value_t = PenaltySettings::default().duration.as_secs())]
    pub penalty_seconds: u64,

    /// Client networks never penalised, whatever they send (ingress
    /// controllers, load balancers and NAT gateways that carry many users'
    /// traffic from one address), comma-separated CIDRs or addresses.
    #[arg(long, env = "TURNSTILE_PENALTY_EXEMPT_CIDRS", value_delimiter = ',')]
    pub penalty_exempt_cidrs: Vec<Cidr>,

    /// How the kernel refuses penalised clients: `sk-lookup` (connection
    /// refused) or `xdp` (SYN dropped; for floods).
    #[arg(long, env = "TURNSTILE_PENALTY_MODE", value_enum, default_value_t = KernelConfig::default().penalty_mode)]
    pub penalty_mode: PenaltyMode,

    /// Beside the kernel's counters, also count each connection's payload
    /// per model in userspace (aibrix_gateway_userspace_bytes_total and
    /// _packets_total, packets being reads and writes): a check on the
    /// kernel's attribution, at two atomic adds per read and write.
    #[arg(long, env = "TURNSTILE_USERSPACE_COUNTERS")]
    pub userspace_counters: bool,

    /// Interfaces the XDP program attaches to with `--penalty-mode xdp`,
    /// comma-separated. [default: every interface]
    #[arg(long, env = "TURNSTILE_XDP_INTERFACES", value_delimiter = ',')]
    pub xdp_interfaces: Vec<String>,
}

impl From<&KernelArgs> for KernelConfig {
    fn from(args: &KernelArgs) -> Self {
        let KernelArgs {
            ebpf,
            bpffs_dir,
            pin_links,
            penalty_threshold,
            penalty_window_seconds,
            penalty_seconds,
            penalty_exempt_cidrs,
            penalty_mode,
            userspace_counters,
            xdp_interfaces,
        } = args;
        Self {
            ebpf: *ebpf,
            bpffs_dir: bpffs_dir.clone(),
            pin_links: *pin_links,
            penalties: PenaltySettings {
                threshold: *penalty_threshold,
                window: Duration::from_secs((*penalty_window_seconds).max(1)),
                duration: Duration::from_secs(*penalty_seconds),
            },
            penalty_exempt_cidrs: penalty_exempt_cidrs.clone(),
            penalty_mode: *penalty_mode,
            userspace_counters: *userspace_counters,
            xdp_interfaces: xdp_interfaces.clone(),
        }
    }
}

/// Whether replicas share engine scrapes through Redis.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricSharing {
    /// Share when a Redis is configured.
    On,
    /// Each replica on its own.
    Off,
}

/// Engine metrics scraping.
#[derive(Args, Debug, Clone)]
pub struct EngineMetricsArgs {
    /// How often each ready pod's `/metrics` is scraped, in milliseconds.
    #[arg(long, env = "AIBRIX_POD_METRIC_REFRESH_INTERVAL_MS",
          default_value_t = millis(ScrapeConfig::default().interval))]
    pub pod_metric_refresh_interval_ms: u64,

    /// Time one scrape may take (connect and body) before it counts as failed.
    #[arg(long, env = "TURNSTILE_POD_METRIC_TIMEOUT_MS", default_value_t = millis(ScrapeConfig::default().timeout))]
    pub pod_metric_timeout_ms: u64,

    /// Age after which a pod's last scrape counts as missing for routing.
    #[arg(long, env = "TURNSTILE_POD_METRIC_STALE_MS", default_value_t = millis(ScrapeConfig::default().stale_after))]
    pub pod_metric_stale_ms: u64,

    /// Most scrapes in flight at once, over all pods.
    #[arg(long, env = "TURNSTILE_POD_METRIC_CONCURRENCY", default_value_t = ScrapeConfig::default().concurrency)]
    pub pod_metric_concurrency: usize,

    /// Most scrapes started per second over all pods. Past this many pods
    /// per refresh interval, each idle pod's period stretches evenly (pods
    /// with requests in flight first) and staleness is judged against the
    /// stretched period.
    #[arg(long, env = "TURNSTILE_POD_METRIC_MAX_SCRAPES_PER_SECOND",
          default_value_t = ScrapeConfig::default().max_scrapes_per_second)]
    pub pod_metric_max_scrapes_per_second: u32,

    /// With a Redis configured (`--redis-url`), replicas share one scrape of
    /// each pod per period: one scrapes and publishes what it read, the
    /// others take it. `off` scrapes every pod from every replica.
    #[arg(long, env = "TURNSTILE_POD_METRIC_SHARING", value_enum, default_value_t = MetricSharing::On)]
    pub pod_metric_sharing: MetricSharing,

    /// Length of the recent window histogram means and token rates are taken over.
    #[arg(long, env = "TURNSTILE_POD_METRIC_WINDOW_SECONDS",
          default_value_t = ScrapeConfig::default().window.as_secs())]
    pub pod_metric_window_seconds: u64,

    /// How often each ready pod's `/v1/models` is read for the LoRA adapters
    /// it serves (entries whose `parent` is its base model), in
    /// milliseconds; a pod is also read as soon as it turns ready. 0: only
    /// ModelAdapter resources say which pod serves an adapter.
    #[arg(long, env = "TURNSTILE_ADAPTER_REFRESH_INTERVAL_MS",
          default_value_t = millis(AdapterReadConfig::default().interval))]
    pub adapter_refresh_interval_ms: u64,
}

impl EngineMetricsArgs {
    /// How the engines' adapter lists are read.
    pub fn adapter_reads(&self) -> AdapterReadConfig {
        AdapterReadConfig { interval: Duration::from_millis(self.adapter_refresh_interval_ms), ..Default::default() }
    }
}

impl From<&EngineMetricsArgs> for ScrapeConfig {
    fn from(args: &EngineMetricsArgs) -> Self {
        let EngineMetricsArgs {
            pod_metric_refresh_interval_ms,
            pod_metric_timeout_ms,
            pod_metric_stale_ms,
            pod_metric_concurrency,
            pod_metric_max_scrapes_per_second,
            pod_metric_sharing: _,
            pod_metric_window_seconds,
            adapter_refresh_interval_ms: _,
        } = args;
        Self {
            interval: Duration::from_millis((*pod_metric_refresh_interval_ms).max(1)),
            timeout: Duration::from_millis((*pod_metric_timeout_ms).max(1)),
            stale_after: Duration::from_millis(*pod_metric_stale_ms),
            concurrency: (*pod_metric_concurrency).max(1),
            max_scrapes_per_second: (*pod_metric_max_scrapes_per_second).max(1),
            window: Duration::from_secs((*pod_metric_window_seconds).max(1)),
        }
    }
}

/// Request tracing (OpenTelemetry, OTLP export). The other standard
/// variables are read as well: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as
/// is, before the flag), `OTEL_EXPORTER_OTLP_HEADERS`,
/// `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_SERVICE_NAME`,
/// `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)`, `OTEL_BSP_*`,
/// `OTEL_SDK_DISABLED`.
#[derive(Args, Debug, Clone)]
pub struct TraceArgs {
    /// OTLP collector to export request traces to (plaintext): with gRPC
    /// `http://otel-collector:4317`; with `--otlp-protocol http/protobuf`
    /// a base URL like `http://otel-collector:4318` (`/v1/traces` is
    /// appended). Tracing is off when neither this nor
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// OTLP transport: `grpc` (AIBrix's default) or `http/protobuf`
    /// (`http`). OTEL_EXPORTER_OTLP_TRACES_PROTOCOL wins when set.
    /// [default: grpc]
    #[arg(long, env = "OTEL_EXPORTER_OTLP_PROTOCOL")]
    pub otlp_protocol: Option<String>,

    /// Share of new traces sampled, 0 to 1; a request whose `traceparent`
    /// says sampled or not keeps its client's decision (parent-based).
    /// [default: 1, or OTEL_TRACES_SAMPLER/OTEL_TRACES_SAMPLER_ARG]
    #[arg(long, env = "TURNSTILE_TRACE_SAMPLING_RATIO")]
    pub trace_sampling_ratio: Option<f64>,
}

impl TraceArgs {
    /// The flags resolved against the process environment.
    pub fn config(&self) -> anyhow::Result<TraceConfig> {
        let Self { otlp_endpoint, otlp_protocol, trace_sampling_ratio } = self;
        TraceConfig::resolve(otlp_endpoint.as_deref(), otlp_protocol.as_deref(), *trace_sampling_ratio, |name| {
            std::env::var(name).ok()
        })
        .map_err(anyhow::Error::msg)
    }
}

/// Strategy knobs, under AIBrix's environment variable names where AIBrix
/// has them.
#[derive(Args, Debug, Clone)]
pub struct RoutingArgs {
    /// prefix-cache: bytes of prompt per hashed block (a trailing partial block is not hashed).
    #[arg(long, env = "AIBRIX_PREFIX_CACHE_BLOCK_SIZE",
          default_value_t = RoutingConfig::default().prefix_cache_block_size,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub prefix_cache_block_size: u32,

    /// prefix-cache: most blocks the index remembers (least recently used go first).
    #[arg(long, env = "AIBRIX_PREFIX_CACHE_BLOCK_NUMBER",
          default_value_t = RoutingConfig::default().prefix_cache_block_number,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub prefix_cache_block_number: u32,

    /// prefix-cache: what the prompt is hashed as.
    #[arg(long, env = "AIBRIX_PREFIX_CACHE_TOKENIZER_TYPE", value_enum,
          default_value_t = RoutingConfig::default().prefix_cache_tokenizer_type)]
    pub prefix_cache_tokenizer_type: PrefixTokenizer,

    /// prefix-cache: seed of the chained block hash.
    #[arg(long, env = "AIBRIX_PREFIX_CACHE_HASH_SEED",
          default_value_t = RoutingConfig::default().prefix_cache_hash_seed)]
    pub prefix_cache_hash_seed: u64,

    /// prefix-cache: when the in-flight counts of the model's pods differ by
    /// more than this, only the least loaded pods are considered.
    #[arg(long, env = "AIBRIX_PREFIX_CACHE_POD_RUNNING_REQUEST_IMBALANCE_ABS_COUNT",
          default_value_t = RoutingConfig::default().prefix_cache_imbalance_abs_count)]
    pub prefix_cache_imbalance_abs_count: u32,

    /// prefix-cache: a pod holding the prefix is skipped when its in-flight
    /// count exceeds the mean by more than this many standard deviations.
    #[arg(long, env = "AIBRIX_PREFIX_CACHE_STANDARD_DEVIATION_FACTOR",
          default_value_t = RoutingConfig::default().prefix_cache_standard_deviation_factor)]
    pub prefix_cache_standard_deviation_factor: f64,

    /// prefix-cache: a pod's blocks unused for this long no longer count as held.
    #[arg(long, env = "AIBRIX_PREFIX_CACHE_EVICTION_DURATION_MINS",
          default_value_t = RoutingConfig::default().prefix_cache_eviction_duration_mins)]
    pub prefix_cache_eviction_duration_mins: u64,

    /// vtc-basic: the window a user's tokens are counted over, in `--vtc-time-unit`s.
    #[arg(long, env = "AIBRIX_ROUTER_VTC_TOKEN_TRACKER_WINDOW_SIZE",
          default_value_t = RoutingConfig::default().vtc_window_size,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub vtc_window_size: u64,

    /// vtc-basic: the unit of `--vtc-window-size`.
    #[arg(long, env = "AIBRIX_ROUTER_VTC_TOKEN_TRACKER_TIME_UNIT", value_enum,
          default_value_t = RoutingConfig::default().vtc_time_unit)]
    pub vtc_time_unit: VtcTimeUnit,

    /// vtc-basic: smallest token bucket users are spread over pods by.
    #[arg(long, env = "AIBRIX_ROUTER_VTC_TOKEN_TRACKER_MIN_TOKENS",
          default_value_t = RoutingConfig::default().vtc_min_tokens)]
    pub vtc_min_tokens: f64,

    /// vtc-basic: weight of the fairness term (user tokens vs pod index).
    #[arg(long, env = "AIBRIX_ROUTER_VTC_BASIC_FAIRNESS_WEIGHT",
          default_value_t = RoutingConfig::default().vtc_fairness_weight)]
    pub vtc_fairness_weight: f64,

    /// vtc-basic: weight of the utilisation term (requests running on the pod).
    #[arg(long, env = "AIBRIX_ROUTER_VTC_BASIC_UTILIZATION_WEIGHT",
          default_value_t = RoutingConfig::default().vtc_utilization_weight)]
    pub vtc_utilization_weight: f64,

    /// vtc-basic: running requests at which a pod counts as fully used.
    #[arg(long, env = "AIBRIX_ROUTER_VTC_BASIC_MAX_POD_LOAD",
          default_value_t = RoutingConfig::default().vtc_max_pod_load)]
    pub vtc_max_pod_load: f64,

    /// vtc-basic: weight of a prompt token in a user's count.
    #[arg(long, env = "AIBRIX_ROUTER_VTC_BASIC_INPUT_TOKEN_WEIGHT",
          default_value_t = RoutingConfig::default().vtc_input_token_weight)]
    pub vtc_input_token_weight: f64,

    /// vtc-basic: weight of a generated token in a user's count.
    #[arg(long, env = "AIBRIX_ROUTER_VTC_BASIC_OUTPUT_TOKEN_WEIGHT",
          default_value_t = RoutingConfig::default().vtc_output_token_weight)]
    pub vtc_output_token_weight: f64,

    /// pd: time the prefill pod has to answer the prefill request, in seconds
    /// (503 and no decode request after).
    #[arg(long, env = "AIBRIX_PREFILL_REQUEST_TIMEOUT",
          default_value_t = crate::proxy::defaults::PREFILL_REQUEST_TIMEOUT_SECONDS,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub prefill_request_timeout_seconds: u64,

    /// pd: send each prompt only to PD pods whose own profile's
    /// `promptLenBucketMinLength`..`promptLenBucketMaxLength` holds its
    /// length in cl100k tokens; prompts no complete roleset fits go to a
    /// `combined` pod (README "Prefill/decode").
    #[arg(long, env = "AIBRIX_PROMPT_LENGTH_BUCKETING", action = clap::ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new(),
          default_value_t = PdSettings::default().prompt_length_bucketing)]
    pub prompt_length_bucketing: bool,

    /// pd: how prefill pods are scored (a profile's `prefillScorePolicy` overrides it).
    #[arg(long, env = "AIBRIX_PREFILL_SCORE_POLICY", value_enum, ignore_case = true,
          default_value_t = PdSettings::default().prefill_score_policy)]
    pub prefill_score_policy: PrefillPolicy,

    /// pd: how decode pods are scored (a profile's `decodeScorePolicy` overrides it).
    #[arg(long, env = "AIBRIX_DECODE_SCORE_POLICY", value_enum, ignore_case = true,
          default_value_t = PdSettings::default().decode_score_policy)]
    pub decode_score_policy: DecodePolicy,

    /// pd: when prefills in flight on the busiest and the idlest prefill pod
    /// differ by more than this, the idlest takes the request.
    #[arg(long, env = "AIBRIX_PREFILL_LOAD_IMBALANCE_MIN_SPREAD",
          default_value_t = PdSettings::default().prefill_imbalance_min_spread)]
    pub prefill_load_imbalance_min_spread: u32,

    /// pd: when requests on the busiest and the idlest decode pod differ by
    /// at least this, the idlest takes the request.
    #[arg(long, env = "AIBRIX_DECODE_LOAD_IMBALANCE_MIN_SPREAD",
          default_value_t = PdSettings::default().decode_imbalance_min_spread)]
    pub decode_load_imbalance_min_spread: f64,

    /// pd: when decode pods' generation throughput (tokens/s) differs by more
    /// than this, the slowest takes the request.
    #[arg(long, env = "AIBRIX_DECODE_THROUGHPUT_IMBALANCE_MIN_SPREAD",
          default_value_t = PdSettings::default().decode_throughput_imbalance_min_spread)]
    pub decode_throughput_imbalance_min_spread: f64,

    /// pd: when the longest time to drain a decode pod's requests is more
    /// than this many times the shortest, the shortest takes the request.
    #[arg(long, env = "AIBRIX_DECODE_SCORE_RATIO_THRESHOLD",
          default_value_t = PdSettings::default().decode_score_ratio_threshold)]
    pub decode_score_ratio_threshold: f64,

    /// pd, `load_balancing`: weight of a decode pod's share of running requests.
    #[arg(long, env = "AIBRIX_DECODE_LB_WEIGHT_RUNNING",
          default_value_t = PdSettings::default().decode_lb_weight_running)]
    pub decode_lb_weight_running: f64,

    /// pd, `load_balancing`: weight of a decode pod's unused generation throughput.
    #[arg(long, env = "AIBRIX_DECODE_LB_WEIGHT_THROUGHPUT",
          default_value_t = PdSettings::default().decode_lb_weight_throughput)]
    pub decode_lb_weight_throughput: f64,

    /// pd, vLLM: the KV connector of prefill pods without the
    /// `model.aibrix.ai/kv-connector-type` label.
    #[arg(long, env = "AIBRIX_KV_CONNECTOR_TYPE", value_enum, ignore_case = true,
          default_value_t = PdSettings::default().kv_connector)]
    pub kv_connector_type: KvConnector,

    /// pd, TensorRT-LLM: this replica's 10-bit machine id in the
    /// `disagg_request_id`s it makes, so replicas do not make the same id.
    /// Unset: derived from POD_NAME (else chosen at random) and logged.
    #[arg(long, env = "AIBRIX_TRT_MACHINE_ID", value_parser = clap::value_parser!(u16).range(0..1024))]
    pub trt_machine_id: Option<u16>,

    /// With a Redis configured (`--redis-url`), replicas share what they
    /// route by: prefix-cache's index and vtc-basic's token counts (on a
    /// stream, read back by a replica that starts) and each pod's requests
    /// in flight (every 100 ms). Redis is never waited on by a request.
    /// `off`: each replica routes from what it alone has seen.
    #[arg(long, env = "TURNSTILE_ROUTING_STATE_SHARING", value_enum, default_value_t = MetricSharing::On)]
    pub routing_state_sharing: MetricSharing,
}

impl From<&RoutingArgs> for RoutingConfig {
    fn from(args: &RoutingArgs) -> Self {
        // `prefill_request_timeout_seconds` and `trt_machine_id` are the proxy's (see `serve`).
        let pd = PdSettings {
            prompt_length_bucketing: args.prompt_length_bucketing,
            prefill_score_policy: args.prefill_score_policy,
            decode_score_policy: args.decode_score_policy,
            prefill_imbalance_min_spread: args.prefill_load_imbalance_min_spread,
            decode_imbalance_min_spread: args.decode_load_imbalance_min_spread,
            decode_throughput_imbalance_min_spread: args.decode_throughput_imbalance_min_spread,
            decode_score_ratio_threshold: args.decode_score_ratio_threshold,
            decode_lb_weight_running: args.decode_lb_weight_running,
            decode_lb_weight_throughput: args.decode_lb_weight_throughput,
            kv_connector: args.kv_connector_type,
        };
        same_fields!(args => RoutingConfig {
            prefix_cache_block_size,
            prefix_cache_block_number,
            prefix_cache_tokenizer_type,
            prefix_cache_hash_seed,
            prefix_cache_imbalance_abs_count,
            prefix_cache_standard_deviation_factor,
            prefix_cache_eviction_duration_mins,
            vtc_window_size,
            vtc_time_unit,
            vtc_min_tokens,
            vtc_fairness_weight,
            vtc_utilization_weight,
            vtc_max_pod_load,
            vtc_input_token_weight,
            vtc_output_token_weight;
            pd,
        })
    }
}

/// Options of `turnstile inspect`.
#[derive(Args, Debug, Clone)]
pub struct InspectArgs {
    /// The bpffs directory the gateway pinned its maps in.
    #[arg(long, env = "TURNSTILE_BPFFS_DIR", default_value = crate::kernel::DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,
}

// The domain enums flags take, with the help line of each value.

impl ValueEnum for EbpfMode {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::Auto, Self::Required, Self::Off]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            Self::Auto => PossibleValue::new("auto")
                .help("Load them; run userspace-only when that fails (logged, shown in /readyz)"),
            Self::Required => PossibleValue::new("required").help("Load them or exit with an error"),
            Self::Off => PossibleValue::new("off").help("Never load them: userspace-only"),
        })
    }
}

impl ValueEnum for PenaltyMode {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::SkLookup, Self::Xdp]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            Self::SkLookup => PossibleValue::new("sk-lookup")
                .help("`sk_lookup` drop: the client's connect fails at once with \"connection refused\""),
            Self::Xdp => PossibleValue::new("xdp")
                .help("XDP drop of SYNs: cheapest against floods; the client waits for its connect timeout"),
        })
    }
}

impl ValueEnum for VtcTimeUnit {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::Minutes, Self::Seconds, Self::Milliseconds]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            Self::Minutes => PossibleValue::new("minutes"),
            Self::Seconds => PossibleValue::new("seconds"),
            Self::Milliseconds => PossibleValue::new("milliseconds"),
        })
    }
}

impl ValueEnum for PrefixTokenizer {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::Character, Self::Tiktoken]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            Self::Character => PossibleValue::new("character").help("The prompt's UTF-8 bytes (AIBrix's default)"),
            Self::Tiktoken => PossibleValue::new("tiktoken").help("cl100k tokens, four big-endian bytes each"),
        })
    }
}

impl ValueEnum for PrefillPolicy {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::PrefixCache, Self::LeastRequest, Self::Conductor]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        let value = PossibleValue::new(self.name());
        Some(match self {
            Self::PrefixCache => {
                value.help("(100 − prefix match %) × 0.1 + prefills / most prefills (AIBrix's default)")
            }
            Self::LeastRequest => value.help("Prefills in flight"),
            Self::Conductor => value.help("Estimated time to first token: queued prefills, cached prefix, the rest"),
        })
    }
}

impl ValueEnum for DecodePolicy {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::LoadBalancing, Self::LeastRequest, Self::Conductor]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        let value = PossibleValue::new(self.name());
        Some(match self {
            Self::LoadBalancing => {
                value.help("(running share + unused throughput share) / free KV cache share (AIBrix's default)")
            }
            Self::LeastRequest => value.help("Requests running"),
            Self::Conductor => value.help("Estimated time between tokens once the request joins"),
        })
    }
}

impl ValueEnum for KvConnector {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::Shfs, Self::Nixl, Self::Mooncake]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        let value = PossibleValue::new(self.name());
        Some(match self {
            Self::Shfs => {
                value.help("kv_transfer_params from the prefill answer into the decode body (AIBrix's default)")
            }
            Self::Nixl => value.help("The whole prefill answer into the decode body as disagg_prefill_resp"),
            Self::Mooncake => value.help("Nothing passed between the two requests"),
        })
    }
}

impl ValueEnum for UserLimitsMode {
    fn value_variants<'a>() -> &'a [Self] {
        &[Self::Turnstile, Self::Aibrix]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            Self::Turnstile => PossibleValue::new("turnstile")
                .help("Users without a record get --default-user-rpm/-tpm; refused requests are not counted"),
            Self::Aibrix => PossibleValue::new("aibrix")
                .help("AIBrix's rules: a user without a record gets 500 `redis: nil`; see README \"Limits\""),
        })
    }
}
