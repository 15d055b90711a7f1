//! Kernel assist (contract section 9): per-model traffic counters and fast
//! reject of penalised clients in the kernel (eBPF, crate `gateway-ebpf`),
//! with a userspace fallback that enforces the same penalties and serves the
//! same counters.
//!
//! The proxy calls in here and nothing here calls back: the listener asks
//! whether to serve a new connection ([`KernelAssist::admit`]) and registers
//! its sockets ([`KernelAssist::track`]); the request path tags sockets with
//! the request's model ([`KernelAssist::tag`]) and reports the 429s it sends
//! ([`KernelAssist::rate_limited`]).
//!
//! - [`loader`]: loading, attaching, pinning (one fallible `load`).
//! - [`tagging`]: per-connection tags and model ids.
//! - [`penalties`]: the 429 policy, the penalty table, Redis sync.
//! - [`counters`]: the `/metrics` series, from the maps or from userspace.
//! - [`inspect`]: `turnstile inspect`, the pinned maps as tables.

pub mod counters;
pub mod inspect;
pub mod loader;
pub mod penalties;
pub mod tagging;

use std::net::IpAddr;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Args, ValueEnum};
use gateway_common::{MAX_MODELS, SockTag};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use counters::{AssistTallies, CounterSource, KernelCollector, UserCounters};
use loader::{LoadConfig, Loaded};
use penalties::{Enforcer, Origin, PenaltyClock, PenaltyPolicy, PenaltySettings, PenaltyTable};
use tagging::{ConnTag, ModelIds, Side};

/// `--ebpf`: whether to load the kernel programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EbpfMode {
    /// Load them; run userspace-only when that fails (logged, shown in /readyz).
    Auto,
    /// Load them or exit with an error.
    Required,
    /// Never load them: userspace-only.
    Off,
}

/// `--penalty-mode`: how the kernel turns penalised clients away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PenaltyMode {
    /// `sk_lookup` drop: the client's connect fails at once with "connection refused".
    SkLookup,
    /// XDP drop of SYNs: cheapest against floods; the client waits for its connect timeout.
    Xdp,
}

/// Kernel assist and client penalties (flags of `turnstile serve`).
#[derive(Args, Debug, Clone)]
pub struct KernelArgs {
    /// Kernel assist: `auto` loads the eBPF programs and falls back to
    /// userspace-only when loading or attaching fails (no CAP_BPF, verifier,
    /// no bpffs); `required` exits instead; `off` never loads them.
    #[arg(long, env = "TURNSTILE_EBPF", value_enum, default_value_t = EbpfMode::Auto)]
    pub ebpf: EbpfMode,

    /// Directory on a bpffs where kernel maps and programs are pinned (a bpffs
    /// is mounted there when none is and the gateway runs as root). One
    /// directory per gateway process; its previous contents are replaced.
    #[arg(long, env = "TURNSTILE_BPFFS_DIR", default_value = "/sys/fs/bpf/turnstile")]
    pub bpffs_dir: PathBuf,

    /// Also pin the program links, so the programs stay attached after the
    /// gateway exits (by default they detach with the process).
    #[arg(long, env = "TURNSTILE_PIN_LINKS")]
    pub pin_links: bool,

    /// Number of 429s within --penalty-window-seconds after which a client
    /// address is penalised: its new connections are refused (0: never).
    #[arg(long, env = "TURNSTILE_PENALTY_THRESHOLD", default_value_t = 20)]
    pub penalty_threshold: u32,

    /// Length of the windows 429s are counted in, seconds.
    #[arg(long, env = "TURNSTILE_PENALTY_WINDOW_SECONDS", default_value_t = 10)]
    pub penalty_window_seconds: u64,

    /// How long a penalty lasts, in seconds past the end of the current
    /// rate-limit (RPS) window.
    #[arg(long, env = "TURNSTILE_PENALTY_SECONDS", default_value_t = 10)]
    pub penalty_seconds: u64,

    /// How the kernel refuses penalised clients: `sk-lookup` (connection
    /// refused) or `xdp` (SYN dropped; for floods).
    #[arg(long, env = "TURNSTILE_PENALTY_MODE", value_enum, default_value_t = PenaltyMode::SkLookup)]
    pub penalty_mode: PenaltyMode,

    /// Interfaces the XDP program attaches to with `--penalty-mode xdp`,
    /// comma-separated. [default: every interface]
    #[arg(long, env = "TURNSTILE_XDP_INTERFACES", value_delimiter = ',')]
    pub xdp_interfaces: Vec<String>,
}

impl KernelArgs {
    fn penalty_settings(&self) -> PenaltySettings {
        PenaltySettings {
            threshold: self.penalty_threshold,
            window: Duration::from_secs(self.penalty_window_seconds.max(1)),
            duration: Duration::from_secs(self.penalty_seconds),
        }
    }
}

/// Whether kernel assist is running, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// Programs loaded and attached.
    Active { attached: String },
    /// `--ebpf auto` could not load them: userspace-only.
    Fallback { reason: String },
    /// `--ebpf off`: userspace-only.
    Off,
}

/// Kernel assist as the proxy sees it.
#[derive(Debug)]
pub struct KernelAssist {
    loaded: Option<Arc<Loaded>>,
    status: Status,
    models: Arc<ModelIds>,
    /// Userspace-only: where connections count their traffic.
    user_counters: Option<Arc<UserCounters>>,
    policy: PenaltyPolicy,
    enforcer: Arc<Enforcer>,
    /// Local penalties on their way to Redis.
    publish: Option<mpsc::Sender<(IpAddr, u64)>>,
    tallies: Arc<AssistTallies>,
}

/// How often expired penalties are swept from the table and the kernel map.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

impl KernelAssist {
    /// Loads the kernel side (per `--ebpf`), wires penalties (and their Redis
    /// sync when `redis_url` is set) and registers the `/metrics` series.
    /// Fails only with `--ebpf required` when loading fails. Needs a runtime.
    pub fn start(
        args: &KernelArgs,
        redis_url: Option<String>,
        metrics: &Metrics,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let (loaded, status) = match args.ebpf {
            EbpfMode::Off => {
                tracing::info!("kernel assist off (--ebpf off): counters and penalties in userspace");
                (None, Status::Off)
            }
            EbpfMode::Auto | EbpfMode::Required => {
                let config = LoadConfig {
                    bpffs_dir: args.bpffs_dir.clone(),
                    pin_links: args.pin_links,
                    penalty_mode: args.penalty_mode,
                    xdp_interfaces: args.xdp_interfaces.clone(),
                };
                match loader::load(&config) {
                    Ok(loaded) => {
                        tracing::info!(
                            attached = %loaded.attached,
                            pinned = %args.bpffs_dir.display(),
                            penalty_mode = ?args.penalty_mode,
                            "kernel assist active"
                        );
                        let attached = loaded.attached.clone();
                        (Some(Arc::new(loaded)), Status::Active { attached })
                    }
                    Err(err) if args.ebpf == EbpfMode::Required => {
                        let log = err.verifier_log().map(|log| format!("\nverifier log:\n{log}")).unwrap_or_default();
                        anyhow::bail!("--ebpf required: kernel assist could not be loaded: {err}{log}");
                    }
                    Err(err) => {
                        const FALLBACK: &str =
                            "kernel assist unavailable; running userspace-only (same penalties and counters)";
                        match err.verifier_log() {
                            Some(log) => tracing::warn!(reason = %err, verifier_log = log, "{FALLBACK}"),
                            None => tracing::warn!(reason = %err, "{FALLBACK}"),
                        }
                        (None, Status::Fallback { reason: err.to_string() })
                    }
                }
            }
        };

        let tallies = Arc::new(AssistTallies::default());
        let table = Arc::new(PenaltyTable::default());
        let enforcer = Arc::new(Enforcer {
            table: Arc::clone(&table),
            clock: Arc::new(PenaltyClock::default()),
            kernel: loaded.as_ref().map(|l| Arc::clone(l) as Arc<dyn penalties::KernelPenalties>),
            tallies: Arc::clone(&tallies),
        });
        let policy = PenaltyPolicy::new(args.penalty_settings());
        let publish = match redis_url {
            Some(url) if args.penalty_threshold > 0 => {
                Some(penalties::spawn_redis_sync(&url, Arc::clone(&enforcer), shutdown.clone())?)
            }
            _ => None,
        };
        let user_counters = loaded.is_none().then(|| Arc::new(UserCounters::default()));
        let models = Arc::new(ModelIds::default());
        let source: Arc<dyn CounterSource> = match (&loaded, &user_counters) {
            (Some(loaded), _) => Arc::clone(loaded) as Arc<dyn CounterSource>,
            (None, Some(user)) => Arc::clone(user) as Arc<dyn CounterSource>,
            (None, None) => Arc::new(UserCounters::default()),
        };
        metrics.set_kernel_collector(Box::new(KernelCollector {
            source,
            models: Arc::clone(&models),
            tallies: Arc::clone(&tallies),
            active: loaded.is_some(),
            penalties: table,
        }));

        let assist = Arc::new(Self { loaded, status, models, user_counters, policy, enforcer, publish, tallies });
        tokio::spawn(sweep_loop(Arc::clone(&assist), shutdown));
        Ok(assist)
    }

    /// Userspace-only kernel assist with the given penalty settings, no Redis
    /// and no metrics (for embedding the proxy in tests).
    pub fn userspace_only(settings: PenaltySettings) -> Arc<Self> {
        let tallies = Arc::new(AssistTallies::default());
        let enforcer = Arc::new(Enforcer {
            table: Arc::new(PenaltyTable::default()),
            clock: Arc::new(PenaltyClock::default()),
            kernel: None,
            tallies: Arc::clone(&tallies),
        });
        Arc::new(Self {
            loaded: None,
            status: Status::Off,
            models: Arc::new(ModelIds::default()),
            user_counters: Some(Arc::new(UserCounters::default())),
            policy: PenaltyPolicy::new(settings),
            enforcer,
            publish: None,
            tallies,
        })
    }

    pub fn status(&self) -> &Status {
        &self.status
    }

    pub fn is_active(&self) -> bool {
        self.loaded.is_some()
    }

    /// Tells the reject programs which port is the proxy listener's.
    pub fn guard_port(&self, port: u16) {
        if let Some(loaded) = &self.loaded
            && let Err(err) = loaded.set_proxy_port(port)
        {
            tracing::warn!(error = %err, port, "kernel assist: setting the proxy port failed; fast reject stays off");
        }
    }

    /// Whether to serve a connection just accepted from `peer`. A penalised
    /// client is refused (the caller closes the socket at once); with kernel
    /// assist this only catches connections that raced the penalty.
    pub fn admit(&self, peer: IpAddr) -> bool {
        if self.is_penalised(peer) {
            self.tallies.refused_userspace.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Whether `peer` is penalised now.
    pub fn is_penalised(&self, peer: IpAddr) -> bool {
        self.enforcer.table.is_penalised(penalties::normalize(peer), self.enforcer.clock.local_now_ms())
    }

    /// Registers a socket the proxy accepted or opened; returns its tag handle.
    pub fn track(&self, fd: RawFd, side: Side) -> Arc<ConnTag> {
        // The kernel recognises client connections by the proxy port; an
        // upstream one is tagged with model 0 so that its traffic is held as
        // pending until the first tag (the request goes out before it).
        if side == Side::Upstream
            && let Some(loaded) = &self.loaded
            && let Err(err) = loaded.tag_socket(fd, SockTag { model: 0, side: side.as_u32() })
        {
            tracing::debug!(error = %err, "kernel assist: socket not tracked");
        }
        Arc::new(ConnTag::new(fd, side, self.user_counters.clone()))
    }

    /// Tags a connection with the model of the request it carries.
    pub fn tag(&self, conn: &ConnTag, model: &str) {
        let (id, new) = self.models.id(model);
        if new && let Some(loaded) = &self.loaded {
            let name = if id == MAX_MODELS - 1 { ModelIds::OVERFLOW } else { model };
            if let Err(err) = loaded.name_model(id, name) {
                tracing::debug!(error = %err, model, "kernel assist: model name not recorded");
            }
        }
        if conn.swap_model(id) == id {
            return;
        }
        match &self.loaded {
            Some(loaded) => {
                let tag = SockTag { model: id, side: conn.side().as_u32() };
                if let Some(Err(err)) = conn.with_fd(|fd| loaded.tag_socket(fd, tag)) {
                    tracing::debug!(error = %err, model, "kernel assist: socket not tagged");
                }
            }
            None => conn.user_tagged(id),
        }
    }

    /// Reports a gateway-made 429 sent to `peer`; penalises it at the threshold.
    pub fn rate_limited(&self, peer: IpAddr) {
        let ip = penalties::normalize(peer);
        let Some(until) = self.policy.record_429(ip, self.enforcer.clock.redis_now_ms()) else {
            return;
        };
        if self.enforcer.apply(ip, until, Origin::Local)
            && let Some(publish) = &self.publish
            && publish.try_send((ip, until)).is_err()
        {
            tracing::warn!(client = %ip, "penalty not published: the Redis queue is full");
        }
    }

    /// The `kernel_assist` detail of `/readyz`.
    pub fn readiness(&self) -> serde_json::Value {
        match &self.status {
            Status::Active { attached } => serde_json::json!({"active": true, "mode": "kernel", "attached": attached}),
            Status::Fallback { reason } => {
                serde_json::json!({"active": false, "mode": "userspace", "reason": reason})
            }
            Status::Off => serde_json::json!({"active": false, "mode": "userspace", "reason": "--ebpf off"}),
        }
    }
}

async fn sweep_loop(assist: Arc<KernelAssist>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        assist.enforcer.sweep();
        assist.policy.sweep(assist.enforcer.clock.redis_now_ms());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn userspace_only_refuses_a_penalised_client_and_counts_it() {
        let settings =
            PenaltySettings { threshold: 2, window: Duration::from_secs(10), duration: Duration::from_secs(5) };
        let assist = KernelAssist::userspace_only(settings);
        let client: IpAddr = "10.0.0.7".parse().unwrap();
        let other: IpAddr = "10.0.0.8".parse().unwrap();
        assert!(assist.admit(client));
        assist.rate_limited(client);
        assert!(assist.admit(client), "one 429 is below the threshold");
        assist.rate_limited("::ffff:10.0.0.7".parse().unwrap());
        assert!(!assist.admit(client), "penalised after the second 429");
        assert!(assist.admit(other));
        assert_eq!(assist.tallies.refused_userspace.load(Ordering::Relaxed), 1);
        assert_eq!(assist.tallies.penalties_local.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn readiness_names_the_mode() {
        let assist = KernelAssist::userspace_only(PenaltySettings {
            threshold: 0,
            window: Duration::from_secs(1),
            duration: Duration::from_secs(1),
        });
        let detail = assist.readiness();
        assert_eq!(detail["active"], false);
        assert_eq!(detail["mode"], "userspace");
    }
}
