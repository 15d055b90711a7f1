//! Kernel assist: per-model traffic counters and fast reject of penalised
//! clients in the kernel (eBPF, crate `gateway-ebpf`), with a userspace
//! fallback that enforces the same penalties and serves the same counters.
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

use gateway_common::{MAX_MODELS, SockTag};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use counters::{AssistTallies, CounterSource, KernelCollector, UserCounters};
use loader::{LoadConfig, Loaded};
use penalties::{
    Cidr, ClientAddr, Enforcer, Origin, PenaltyClock, PenaltyDecision, PenaltyPolicy, PenaltyReason, PenaltySettings,
    Scope, Shared,
};
use tagging::{ConnTag, ModelIds, Side};

/// `--ebpf`: whether to load the kernel programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EbpfMode {
    /// Load them; run userspace-only when that fails (logged, shown in /readyz).
    Auto,
    /// Load them or exit with an error.
    Required,
    /// Never load them: userspace-only.
    Off,
}

/// `--penalty-mode`: how the kernel turns penalised clients away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PenaltyMode {
    /// `sk_lookup` drop: the client's connect fails at once with "connection refused".
    SkLookup,
    /// XDP drop of SYNs: cheapest against floods; the client waits for its connect timeout.
    Xdp,
}

/// Where kernel maps and programs are pinned unless told otherwise.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/turnstile";

/// Kernel assist and client penalties (set by `turnstile serve` flags, whose
/// defaults these are).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelConfig {
    /// Whether to load the kernel programs.
    pub ebpf: EbpfMode,
    /// Directory on a bpffs where kernel maps and programs are pinned.
    pub bpffs_dir: PathBuf,
    /// Also pin the program links, so the programs stay attached after exit.
    pub pin_links: bool,
    /// When a client counts as flooding, and for how long it is refused.
    pub penalties: PenaltySettings,
    /// Client networks never penalised.
    pub penalty_exempt_cidrs: Vec<Cidr>,
    /// How the kernel refuses penalised clients.
    pub penalty_mode: PenaltyMode,
    /// Also count each connection's payload per model in userspace.
    pub userspace_counters: bool,
    /// Interfaces the XDP program attaches to (empty: every interface).
    pub xdp_interfaces: Vec<String>,
}

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            ebpf: EbpfMode::Auto,
            bpffs_dir: PathBuf::from(DEFAULT_BPFFS_DIR),
            pin_links: false,
            penalties: PenaltySettings::default(),
            penalty_exempt_cidrs: Vec::new(),
            penalty_mode: PenaltyMode::SkLookup,
            userspace_counters: false,
            xdp_interfaces: Vec::new(),
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
    publish: Option<mpsc::Sender<Shared>>,
    tallies: Arc<AssistTallies>,
}

/// How often expired penalties are swept from the table and the kernel map.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

impl KernelAssist {
    /// Loads the kernel side (per `config.ebpf`), wires penalties (and their
    /// Redis sync when `redis_url` is set) and registers the `/metrics`
    /// series. Fails only with `--ebpf required` when loading fails. Needs a
    /// runtime.
    pub fn start(
        config: &KernelConfig,
        redis_url: Option<String>,
        metrics: &Metrics,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let (loaded, status) = match config.ebpf {
            EbpfMode::Off => {
                tracing::info!("kernel assist off (--ebpf off): counters and penalties in userspace");
                (None, Status::Off)
            }
            EbpfMode::Auto | EbpfMode::Required => {
                let load = LoadConfig {
                    bpffs_dir: config.bpffs_dir.clone(),
                    pin_links: config.pin_links,
                    penalty_mode: config.penalty_mode,
                    xdp_interfaces: config.xdp_interfaces.clone(),
                };
                match loader::load(&load) {
                    Ok(loaded) => {
                        tracing::info!(
                            attached = %loaded.attached,
                            pinned = %config.bpffs_dir.display(),
                            penalty_mode = ?config.penalty_mode,
                            "kernel assist active"
                        );
                        let attached = loaded.attached.clone();
                        (Some(Arc::new(loaded)), Status::Active { attached })
                    }
                    Err(err) if config.ebpf == EbpfMode::Required => {
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
        let enforcer = Arc::new(Enforcer::new(
            PenaltyClock::default(),
            loaded.as_ref().map(|l| Arc::clone(l) as Arc<dyn penalties::KernelPenalties>),
            Arc::clone(&tallies),
        ));
        let table = Arc::clone(&enforcer.table);
        let policy = PenaltyPolicy::new(config.penalties, config.penalty_exempt_cidrs.clone());
        let publish = match redis_url {
            Some(url) if config.penalties.threshold > 0 => {
                Some(penalties::spawn_redis_sync(&url, Arc::clone(&enforcer), shutdown.clone())?)
            }
            _ => None,
        };
        let user_counters = (loaded.is_none() || config.userspace_counters).then(|| Arc::new(UserCounters::default()));
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
            userspace: user_counters.clone().filter(|_| config.userspace_counters),
        }));

        let assist = Arc::new(Self { loaded, status, models, user_counters, policy, enforcer, publish, tallies });
        tokio::spawn(sweep_loop(Arc::clone(&assist), shutdown));
        Ok(assist)
    }

    /// Userspace-only kernel assist with the given penalty settings, no Redis
    /// and no metrics (for embedding the proxy in tests).
    pub fn userspace_only(settings: PenaltySettings, exempt: Vec<Cidr>) -> Arc<Self> {
        let tallies = Arc::new(AssistTallies::default());
        let enforcer = Arc::new(Enforcer::new(PenaltyClock::default(), None, Arc::clone(&tallies)));
        Arc::new(Self {
            loaded: None,
            status: Status::Off,
            models: Arc::new(ModelIds::default()),
            user_counters: Some(Arc::new(UserCounters::default())),
            policy: PenaltyPolicy::new(settings, exempt),
            enforcer,
            publish: None,
            tallies,
        })
    }

    pub fn status(&self) -> &Status {
        &self.status
    }

    fn is_active(&self) -> bool {
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

    /// Registers a client socket the proxy accepted; returns its tag handle.
    /// The kernel recognises it by the proxy port until its first tag.
    pub fn track_client(&self, fd: RawFd) -> Arc<ConnTag> {
        Arc::new(ConnTag::new(fd, Side::Client, self.user_counters.clone()))
    }

    /// Registers an upstream socket the proxy opened for model id `model`
    /// (each pod has a pool per model, so the socket never changes model);
    /// returns its tag handle.
    pub fn track_upstream(&self, fd: RawFd, model: u32) -> Arc<ConnTag> {
        let conn = Arc::new(ConnTag::new(fd, Side::Upstream, self.user_counters.clone()));
        self.tag_id(&conn, model);
        conn
    }

    /// The id the kernel counts `model` under, its name recorded in the
    /// kernel map when new.
    pub fn model_id(&self, model: &str) -> u32 {
        let (id, new) = self.models.id(model);
        if new && let Some(loaded) = &self.loaded {
            let name = if id == MAX_MODELS - 1 { ModelIds::OVERFLOW } else { model };
            if let Err(err) = loaded.name_model(id, name) {
                tracing::debug!(error = %err, model, "kernel assist: model name not recorded");
            }
        }
        id
    }

    /// Tags a connection with the model of the request it carries. A
    /// socket is only written when the model changes: the kernel finds
    /// where one request ends and the next begins by itself.
    pub fn tag(&self, conn: &ConnTag, model: &str) {
        self.tag_id(conn, self.model_id(model));
    }

    fn tag_id(&self, conn: &ConnTag, id: u32) {
        if id == 0 || conn.swap_model(id) == id {
            return;
        }
        if let Some(loaded) = &self.loaded {
            let tag = SockTag { model: id, side: conn.side().as_u32() };
            if let Some(Err(err)) = conn.with_fd(|fd| loaded.tag_socket(fd, tag)) {
                tracing::debug!(error = %err, model = id, "kernel assist: socket not tagged");
            }
        }
        conn.user_tagged(id);
    }

    /// How long `client` is still refused, when it is penalised: a request
    /// of a penalised client that still reaches the proxy (on a connection
    /// opened before, or through a trusted proxy) is answered 429.
    pub fn penalty_remaining(&self, client: ClientAddr) -> Option<Duration> {
        self.enforcer.remaining(client)
    }

    /// Reports a gateway-made 429 sent to `client`; decides at the threshold.
    pub fn rate_limited(&self, client: ClientAddr) {
        let Some(decision) = self.policy.record_429(client, self.enforcer.clock.redis_now_ms()) else {
            return;
        };
        let PenaltyDecision { reason, until_ms } = decision;
        self.tallies.decided(reason);
        let scope = match reason {
            PenaltyReason::Exempt => {
                tracing::info!(
                    client = %client.ip,
                    reason = reason.as_str(),
                    threshold = self.policy.settings().threshold,
                    window_seconds = self.policy.settings().window.as_secs(),
                    "client over the flood threshold, not penalised: its address is in --penalty-exempt-cidrs"
                );
                return;
            }
            PenaltyReason::Flood => Scope::Direct,
            PenaltyReason::FloodBehindProxy => Scope::BehindProxy,
        };
        let was_penalised = self.enforcer.remaining(client).is_some();
        if !self.enforcer.apply(client.ip, until_ms, scope, Origin::Local) {
            return;
        }
        let until_local = self.enforcer.clock.to_local(until_ms);
        let in_ms = until_local.saturating_sub(self.enforcer.clock.local_now_ms());
        if was_penalised {
            tracing::debug!(client = %client.ip, reason = reason.as_str(), in_ms, "penalty extended: still flooding");
        } else {
            tracing::info!(
                client = %client.ip,
                reason = reason.as_str(),
                threshold = self.policy.settings().threshold,
                window_seconds = self.policy.settings().window.as_secs(),
                until_unix_ms = until_local,
                in_ms,
                refused_by = match (scope, self.is_active()) {
                    (Scope::BehindProxy, _) => "429 per request (behind a trusted proxy)",
                    (Scope::Direct, true) => "the kernel (new connections)",
                    (Scope::Direct, false) => "closing new connections after accept",
                },
                "client penalised"
            );
        }
        if let Some(publish) = &self.publish
            && publish.try_send(Shared { ip: client.ip, until_ms, scope }).is_err()
        {
            tracing::warn!(client = %client.ip, "penalty not published: the Redis queue is full");
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

    fn two_strikes() -> PenaltySettings {
        PenaltySettings { threshold: 2, window: Duration::from_secs(10), duration: Duration::from_secs(5) }
    }

    #[tokio::test]
    async fn userspace_only_refuses_a_penalised_client_and_counts_it() {
        let assist = KernelAssist::userspace_only(two_strikes(), Vec::new());
        let client: IpAddr = "10.0.0.7".parse().unwrap();
        let other: IpAddr = "10.0.0.8".parse().unwrap();
        assert!(assist.admit(client));
        assist.rate_limited(ClientAddr::direct(client));
        assert!(assist.admit(client), "one 429 is below the threshold");
        assist.rate_limited(ClientAddr::direct("::ffff:10.0.0.7".parse().unwrap()));
        assert!(!assist.admit(client), "penalised after the second 429");
        assert!(assist.penalty_remaining(ClientAddr::direct(client)).is_some());
        assert!(assist.admit(other));
        assert_eq!(assist.tallies.refused_userspace.load(Ordering::Relaxed), 1);
        assert_eq!(assist.tallies.penalties_local.load(Ordering::Relaxed), 1);
        assert_eq!(assist.tallies.decisions(PenaltyReason::Flood), 1);
    }

    #[tokio::test]
    async fn exempt_and_proxied_clients_keep_their_connections() {
        let exempt = vec!["10.0.0.0/24".parse().unwrap()];
        let assist = KernelAssist::userspace_only(two_strikes(), exempt);
        let nat: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..10 {
            assist.rate_limited(ClientAddr::direct(nat));
        }
        assert!(assist.admit(nat), "an exempt address is never refused");
        assert_eq!(assist.penalty_remaining(ClientAddr::direct(nat)), None);
        assert_eq!(assist.tallies.decisions(PenaltyReason::Exempt), 5, "one decision per threshold crossing");

        let behind = ClientAddr { ip: "192.0.2.1".parse().unwrap(), behind_proxy: true };
        assist.rate_limited(behind);
        assist.rate_limited(behind);
        assert!(assist.penalty_remaining(behind).is_some(), "answered 429 from now on");
        assert!(assist.admit(behind.ip), "but its address's connections are not refused");
        assert_eq!(assist.tallies.decisions(PenaltyReason::FloodBehindProxy), 1);
    }

    #[test]
    fn readiness_names_the_mode() {
        let assist =
            KernelAssist::userspace_only(PenaltySettings { threshold: 0, ..PenaltySettings::default() }, Vec::new());
        let detail = assist.readiness();
        assert_eq!(detail["active"], false);
        assert_eq!(detail["mode"], "userspace");
    }
}
