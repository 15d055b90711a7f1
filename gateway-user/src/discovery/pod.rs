//! What the gateway knows about one engine pod, read from Kubernetes pod
//! metadata (AIBrix's labels: `model.aibrix.ai/name`, `model.aibrix.ai/port`...).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;

use crate::engine_report::{GaugeRead, Gauges, PodGauges, PodMetrics, Stamp};

/// Label (or annotation, for names containing `/`) naming the model a pod serves.
pub const MODEL_NAME_LABEL: &str = "model.aibrix.ai/name";
/// Label holding the serving port.
pub const PORT_LABEL: &str = "model.aibrix.ai/port";
/// Label holding the metrics port.
pub const METRIC_PORT_LABEL: &str = "model.aibrix.ai/metric-port";
/// Label naming the inference engine.
pub const ENGINE_LABEL: &str = "model.aibrix.ai/engine";
/// Annotation holding the model's config profiles.
pub const CONFIG_ANNOTATION: &str = "model.aibrix.ai/config";
/// Container env naming a pod's data-parallel ranks (AIBrix's name).
pub const DATA_PARALLEL_ENV: &str = "data-parallel-size";
/// Most data-parallel ranks a pod is routed as (a typo must not make
/// thousands of routing targets).
pub const MAX_DATA_PARALLEL: u16 = 64;
/// Annotation listing extra path prefixes the model serves, comma-separated
/// (AIBrix's model router adds them to the model's HTTPRoute).
pub const CUSTOM_PATHS_ANNOTATION: &str = "model.aibrix.ai/model-router-custom-paths";
/// PD: the roleset a pod belongs to.
pub const ROLESET_LABEL: &str = "roleset-name";
/// PD: `prefill` or `decode`.
pub const ROLE_LABEL: &str = "role-name";
/// PD: the replica of its role a pod belongs to (a replica may span pods).
pub const ROLE_REPLICA_INDEX_LABEL: &str = "stormservice.orchestration.aibrix.ai/role-replica-index";
/// PD, vLLM: the KV connector (`shfs`, `nixl`, `mooncake`).
pub const KV_CONNECTOR_LABEL: &str = "model.aibrix.ai/kv-connector-type";
/// PD, SGLang: the port of the prefill pod's bootstrap server.
pub const SGLANG_BOOTSTRAP_PORT_ANNOTATION: &str = "model.aibrix.ai/sglang-bootstrap-port";
/// SGLang's default bootstrap port.
pub const DEFAULT_SGLANG_BOOTSTRAP_PORT: u16 = 8998;

/// Ray: `worker` pods of a Ray cluster do not serve HTTP (only the head does).
pub const RAY_NODE_TYPE_LABEL: &str = "ray.io/node-type";
/// StormService: only pod group `0` (or a pod without the label) serves HTTP.
pub const POD_GROUP_INDEX_LABEL: &str = "stormservice.orchestration.aibrix.ai/pod-group-index";

/// The port AIBrix assumes when the port label is missing or unusable.
pub const DEFAULT_PORT: u16 = 8000;

/// Live load of one pod as the gateway sees it. Shared between pod-store
/// generations so a reload never resets the count of requests in flight.
///
/// Besides this replica's own count, two views of the rest of the fleet's
/// requests feed [`PodLoad::routing_load`]: what the other replicas say they
/// have in flight (through Redis, as it changes), and the engine's own count
/// of running and waiting requests at its last reading, moved by what the
/// replicas started and finished since (this one's own, the others' as they
/// report them). Each lapses when not renewed.
///
/// Laid out for routing, which reads many pods' per request: the gauges of
/// the engine's latest metrics on the first cache line, the counts on the
/// next (see [`PodLoad::warm`]).
#[derive(Debug, Default)]
#[repr(C)]
pub struct PodLoad {
    /// The gauges of the engine's latest metrics (below), on a cache line
    /// of their own.
    engine_gauges: PodGauges,
    in_flight: AtomicUsize,
    /// The other replicas' requests in flight on the pod, as they last said.
    others: AtomicUsize,
    /// Until when (on [`clock_ms`]) `others` holds; 0: never said.
    others_until: AtomicU64,
    /// The engine's running plus waiting requests at its last reading.
    engine_queue: AtomicUsize,
    /// This replica's in-flight count when the scrape of that reading started.
    engine_base: AtomicUsize,
    /// The other replicas' count (as they said) when the reading came;
    /// [`NOT_HEARD`] when their word had lapsed then.
    engine_others: AtomicUsize,
    /// Until when (on [`clock_ms`]) the engine reading holds; 0: none.
    engine_until: AtomicU64,
    /// Upstream connection slots (`--max-connections-per-pod`), made on
    /// first use; one HTTP/1.1 request in flight holds one connection.
    connection_slots: std::sync::OnceLock<Arc<tokio::sync::Semaphore>>,
    /// The engine's latest metrics, published by the scraper (through the
    /// pod's slot in the engine metrics store): kept here, beside the
    /// counts routing reads anyway, so a request reads a pod's metrics
    /// through the pod itself rather than looking it up by name among all
    /// the fleet's.
    engine_metrics: arc_swap::ArcSwapOption<PodMetrics>,
}

const _: () = assert!(std::mem::offset_of!(PodLoad, in_flight) == 64, "the counts on the gauges' next line");

/// Milliseconds since the process first asked, never 0: the clock the
/// lapsing parts of a [`PodLoad`] are timed by.
fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let elapsed = START.get_or_init(Instant::now).elapsed();
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX).saturating_add(1)
}

/// A reading of the clock [`PodLoad::routing_load_at`] judges lapsed views by.
#[derive(Clone, Copy, Debug)]
pub struct LoadClock(u64);

impl LoadClock {
    /// The clock now.
    pub fn now() -> Self {
        Self(clock_ms())
    }
}

/// [`PodLoad`]'s `engine_others` when the other replicas were not heard.
const NOT_HEARD: usize = usize::MAX;

/// The other replicas' requests in flight on a pod when an engine reading
/// was taken (see [`PodLoad::others_heard`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OthersHeard(usize);

/// Woken when a request starts or ends on any pod.
static LOAD_CHANGED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Resolves after a request started or ended on some pod since the last
/// wait (or during this one): what the replica tells the others changed.
pub async fn load_changed() {
    LOAD_CHANGED.notified().await;
}

fn until(valid_for: Duration) -> u64 {
    clock_ms().saturating_add(u64::try_from(valid_for.as_millis()).unwrap_or(u64::MAX))
}

impl PodLoad {
    /// Requests this replica routed to the pod whose response has not ended yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The load routing compares pods by: the most of this replica's
    /// requests in flight plus the other replicas' (when they said within
    /// the last second, through Redis), and the engine's running and
    /// waiting requests at its last reading (when recent) moved by what
    /// changed since in the counts the replicas say: this replica's starts
    /// and ends, and the others' as they report them.
    ///
    /// Every replica reads the engine alike, so replicas that cannot talk
    /// still see each other's load within a scrape period, and load that no
    /// replica reports (one that cannot publish, traffic sent to the engine
    /// directly) still counts; between scrapes a replica's own starts keep
    /// it from herding onto the pod that read lowest. Replicas that do talk
    /// turn their requests over many times within a scrape period, so the
    /// reading is moved by their reported ends too: otherwise a pod that
    /// read high would look busy long after its requests ended, and be
    /// passed over until the next scrape.
    pub fn routing_load(&self) -> usize {
        self.routing_load_at(LoadClock::now())
    }

    /// [`PodLoad::routing_load`] as of `now`: a request comparing many pods
    /// reads the clock once for them all.
    pub fn routing_load_at(&self, now: LoadClock) -> usize {
        let LoadClock(now) = now;
        let own = self.in_flight();
        let others = self.others_now(now);
        let mut load = own.saturating_add(others.unwrap_or(0));
        if self.engine_until.load(Ordering::Acquire) > now {
            let queue = self.engine_queue.load(Ordering::Relaxed);
            let base = self.engine_base.load(Ordering::Relaxed);
            // Not hearing the others now or at the reading: what they had then stands.
            let (others, then) = match (others, self.engine_others.load(Ordering::Relaxed)) {
                (Some(others), then) if then != NOT_HEARD => (others, then),
                _ => (0, 0),
            };
            load = load.max(queue.saturating_add(own).saturating_add(others).saturating_sub(base.saturating_add(then)));
        }
        load
    }

    /// The other replicas' requests in flight on the pod, as they last said;
    /// `None` once that lapsed.
    fn others_now(&self, now: u64) -> Option<usize> {
        (self.others_until.load(Ordering::Acquire) > now).then(|| self.others.load(Ordering::Relaxed))
    }

    /// [`PodLoad::engine_reading_at`] with the other replicas' count as
    /// said now taken as theirs at the reading.
    #[cfg(test)]
    pub fn engine_reading(&self, queue: usize, base: usize, valid_for: Duration) {
        self.engine_reading_at(queue, base, self.others_heard(), valid_for);
    }

    /// The engine counted `queue` requests running or waiting when this
    /// replica had `base` in flight and the others `others` (as
    /// [`PodLoad::others_heard`] gave it when the scrape started); believed
    /// for `valid_for`.
    pub fn engine_reading_at(&self, queue: usize, base: usize, others: OthersHeard, valid_for: Duration) {
        self.engine_queue.store(queue, Ordering::Relaxed);
        self.engine_base.store(base, Ordering::Relaxed);
        self.engine_others.store(others.0, Ordering::Relaxed);
        self.engine_until.store(until(valid_for), Ordering::Release);
    }

    /// The other replicas' requests in flight on the pod as said now, to
    /// time an engine reading by.
    pub fn others_heard(&self) -> OthersHeard {
        OthersHeard(self.others_now(clock_ms()).unwrap_or(NOT_HEARD))
    }

    /// The replicas heard changed (one went silent, or one was heard anew):
    /// the others' sum now moves by more than their requests, so the engine
    /// reading is no longer moved by it until the next reading. A replica
    /// that stops reporting keeps counting through the reading, and one
    /// heard again is not counted twice.
    pub fn others_changed(&self) {
        self.engine_others.store(NOT_HEARD, Ordering::Relaxed);
    }

    /// The other replicas have `count` requests in flight on the pod;
    /// believed for `valid_for`.
    pub fn others_in_flight(&self, count: usize, valid_for: Duration) {
        self.others.store(count, Ordering::Relaxed);
        self.others_until.store(until(valid_for), Ordering::Release);
    }

    /// The engine's latest metrics, however old (`None`: none yet, or the
    /// pod is no longer scraped).
    pub fn engine_metrics(&self) -> Option<Arc<PodMetrics>> {
        self.engine_metrics.load_full()
    }

    /// The gauges of the engine's latest metrics and when they were scraped,
    /// however old (`None`: none yet, or the pod is no longer scraped). What
    /// strategies score pods by: read with plain loads from the pod's own
    /// memory, no reference taken (a strategy reads many pods' per request,
    /// from many threads at once).
    pub fn engine_gauges(&self) -> Option<(Stamp, Gauges)> {
        match self.engine_gauges.read() {
            GaugeRead::Held(scraped_at, gauges) => Some((scraped_at, gauges)),
            GaugeRead::Empty => None,
            GaugeRead::Busy => {
                self.engine_metrics.load().as_deref().map(|m| (Stamp::of(m.scraped_at), Gauges::from(m)))
            }
        }
    }

    /// Starts bringing what routing reads of the pod into the CPU's cache,
    /// so that a strategy comparing many pods waits for them all at once
    /// rather than for each in turn (the reads of a scoring loop overlap
    /// less: each does more work before the next). Returns what it read,
    /// for the caller to keep (see [`std::hint::black_box`]).
    pub fn warm(&self) -> u64 {
        let stamp = self.engine_gauges.stamp();
        stamp.wrapping_add(self.in_flight.load(Ordering::Relaxed) as u64)
    }

    /// Replaces the engine's latest metrics (and their gauges), returning
    /// the previous ones. Only the pod's metrics slot calls this.
    pub(crate) fn swap_engine_metrics(&self, metrics: Option<Arc<PodMetrics>>) -> Option<Arc<PodMetrics>> {
        let gauges = metrics.as_deref().map(|m| (m.scraped_at, Gauges::from(m)));
        self.engine_gauges.publish(gauges, || self.engine_metrics.swap(metrics))
    }

    /// The pod's upstream connection slots, `cap` of them.
    pub fn connection_slots(&self, cap: usize) -> Arc<tokio::sync::Semaphore> {
        Arc::clone(self.connection_slots.get_or_init(|| Arc::new(tokio::sync::Semaphore::new(cap))))
    }

    /// Marks one more request as running on the pod until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        LOAD_CHANGED.notify_one();
        InFlightGuard { load: Arc::clone(self) }
    }
}

/// Decrements the pod's in-flight count when the response ends, however it ends.
#[derive(Debug)]
pub struct InFlightGuard {
    load: Arc<PodLoad>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
        LOAD_CHANGED.notify_one();
    }
}

/// PD role of a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Prefill,
    Decode,
    /// No role label, or one that is neither prefill nor decode.
    Combined,
}

/// What prefill/decode routing reads of a pod besides its role.
#[derive(Clone, Debug, Default)]
pub struct PodPd {
    /// `model.aibrix.ai/kv-connector-type`, as written.
    pub kv_connector: Option<String>,
    /// `model.aibrix.ai/sglang-bootstrap-port`, else SGLang's default.
    pub bootstrap_port: u16,
    /// The pod's own `model.aibrix.ai/config` profiles, as `pd` reads them
    /// (`None`: no annotation, or one that does not parse).
    pub profiles: Option<Arc<crate::profiles::PodPdProfiles>>,
}

/// One engine pod, immutable for the lifetime of a pod-store generation.
/// A clone shares the original's [`PodLoad`].
#[derive(Clone, Debug)]
pub struct PodInfo {
    /// `namespace/name`: unique across the cluster, stable across reloads.
    pub key: String,
    pub name: String,
    pub namespace: String,
    pub model: String,
    /// Serving address (pod IP and serving port). `None` until the pod has an IP.
    pub addr: Option<SocketAddr>,
    /// `IP:port` as shown in `target-pod-ip`.
    pub addr_text: String,
    pub metric_port: u16,
    pub engine: String,
    pub roleset: Option<String>,
    pub role: Role,
    /// Prefill/decode settings.
    pub pd: PodPd,
    pub labels: BTreeMap<String, String>,
    /// Raw `model.aibrix.ai/config` annotation, parsed by the profiles module.
    pub config_annotation: Option<String>,
    /// Path prefixes from `model.aibrix.ai/model-router-custom-paths`.
    pub custom_paths: Vec<String>,
    /// Data-parallel ranks serving on consecutive ports from `addr` (container
    /// env `data-parallel-size`, as AIBrix reads it); 1 for most pods. The
    /// store routes each rank as a pod of its own.
    pub data_parallel: u16,
    /// Ready for new requests: has an IP, is not terminating, condition Ready=True.
    pub ready: bool,
    pub load: Arc<PodLoad>,
    /// Its handles on its own AIBrix series (this generation's labels; a
    /// clone starts without).
    pub series: crate::metrics::SeriesHandles,
}

/// Why a pod carrying the model label could not be used at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodError {
    #[error("pod has no metadata.name")]
    NoName,
}

impl PodInfo {
    /// Reads a Kubernetes pod. `Ok(None)` for pods without the model label
    /// (they are not ours) and for pods of a multi-pod engine that do not
    /// serve HTTP (Ray workers, StormService pod groups past `0`), as AIBrix
    /// skips them; `Err` for pods that carry it but are unusable.
    pub fn from_pod(pod: &Pod) -> Result<Option<Self>, PodError> {
        let meta = &pod.metadata;
        let labels = meta.labels.clone().unwrap_or_default();
        let ray_worker = labels.get(RAY_NODE_TYPE_LABEL).is_some_and(|t| t.trim() == "worker");
        // An index, read as a number (`"00"` is group 0).
        let later_group = labels
            .get(POD_GROUP_INDEX_LABEL)
            .is_some_and(|i| i.trim().parse::<u64>().map_or(i.trim() != "0", |index| index != 0));
        if ray_worker || later_group {
            return Ok(None);
        }
        let annotations = meta.annotations.as_ref();
        let model = labels
            .get(MODEL_NAME_LABEL)
            .or_else(|| annotations.and_then(|a| a.get(MODEL_NAME_LABEL)))
            .map(|m| m.trim().to_owned())
            .filter(|m| !m.is_empty());
        let Some(model) = model else {
            return Ok(None);
        };
        let name = meta.name.clone().ok_or(PodError::NoName)?;
        let namespace = meta.namespace.clone().unwrap_or_else(|| "default".to_owned());
        let port = port_label(&labels, PORT_LABEL, &name, DEFAULT_PORT);
        let metric_port = port_label(&labels, METRIC_PORT_LABEL, &name, port);
        let status = pod.status.as_ref();
        let ip: Option<IpAddr> = status.and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse().ok());
        let addr = ip.map(|ip| SocketAddr::new(ip, port));
        let condition_ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|conds| conds.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let terminating = meta.deletion_timestamp.is_some();
        let role = match labels.get(ROLE_LABEL).map(String::as_str) {
            Some("prefill") => Role::Prefill,
            Some("decode") => Role::Decode,
            _ => Role::Combined,
        };
        let data_parallel = data_parallel_size(pod, &name);
        let pd = pod_pd(&labels, annotations, &name);
        Ok(Some(Self {
            key: format!("{namespace}/{name}"),
            addr_text: addr.map(|a| a.to_string()).unwrap_or_default(),
            ready: addr.is_some() && condition_ready && !terminating,
            addr,
            metric_port,
            engine: labels.get(ENGINE_LABEL).cloned().unwrap_or_else(|| "vllm".to_owned()),
            roleset: labels.get(ROLESET_LABEL).cloned(),
            role,
            pd,
            config_annotation: annotations.and_then(|a| a.get(CONFIG_ANNOTATION)).cloned(),
            custom_paths: annotations
                .and_then(|a| a.get(CUSTOM_PATHS_ANNOTATION))
                .map_or_else(Vec::new, |v| custom_paths(v)),
            data_parallel,
            labels,
            name,
            namespace,
            model,
            load: Arc::default(),
            series: Default::default(),
        }))
    }
}

impl PodInfo {
    /// The routing targets of this pod: itself, or one per data-parallel
    /// rank, rank `i` on port `+i`, keyed `namespace/name:port` and still
    /// named as the pod. A rank serves its own metrics unless the pod names
    /// a metrics port of its own (`model.aibrix.ai/metric-port`), which
    /// every rank then reads.
    pub fn ranks(self) -> Vec<Self> {
        let Some(addr) = self.addr.filter(|_| self.data_parallel > 1) else {
            return vec![self];
        };
        (0..self.data_parallel)
            .map_while(|rank| {
                let port = addr.port().checked_add(rank)?;
                let own_metrics = self.metric_port == addr.port();
                let addr = SocketAddr::new(addr.ip(), port);
                Some(Self {
                    key: format!("{}:{port}", self.key),
                    addr: Some(addr),
                    addr_text: addr.to_string(),
                    metric_port: if own_metrics { port } else { self.metric_port },
                    load: Arc::default(),
                    ..self.clone()
                })
            })
            .collect()
    }
}

impl crate::metrics::PodIdentity for PodInfo {
    fn key(&self) -> &str {
        &self.key
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn namespace(&self) -> &str {
        &self.namespace
    }

    fn model(&self) -> &str {
        &self.model
    }

    fn engine(&self) -> &str {
        &self.engine
    }

    fn roleset(&self) -> Option<&str> {
        self.roleset.as_deref()
    }

    fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }

    fn series(&self) -> Option<&crate::metrics::SeriesHandles> {
        Some(&self.series)
    }
}

/// Container env `data-parallel-size` of the first container that sets it:
/// the pod serves that many ranks on consecutive ports. Missing, not a
/// number or below 2: one port (AIBrix's reading), with a warning when it is
/// not a number.
fn data_parallel_size(pod: &Pod, name: &str) -> u16 {
    let containers = pod.spec.as_ref().map(|spec| spec.containers.as_slice()).unwrap_or_default();
    let value = containers
        .iter()
        .flat_map(|container| container.env.as_deref().unwrap_or_default())
        .find(|env| env.name == DATA_PARALLEL_ENV && env.value.as_deref().is_some_and(|v| !v.is_empty()))
        .and_then(|env| env.value.as_deref());
    match value.map(|v| (v, v.trim().parse::<u16>())) {
        None => 1,
        Some((value, Ok(size))) if size > MAX_DATA_PARALLEL => {
            if first_warning(format!("{name}\0{DATA_PARALLEL_ENV}\0{value}")) {
                tracing::warn!(
                    pod = name,
                    value,
                    max = MAX_DATA_PARALLEL,
                    "data-parallel-size is too large; routing to one port"
                );
            }
            1
        }
        Some((_, Ok(size))) => size.max(1),
        Some((value, Err(_))) => {
            if first_warning(format!("{name}\0{DATA_PARALLEL_ENV}\0{value}")) {
                tracing::warn!(pod = name, value, "data-parallel-size is not a number; routing to one port");
            }
            1
        }
    }
}

/// Whether a warning about `what` (a pod's setting and its value) is new:
/// pods are read again on every reload and watch event, and a bad label
/// would otherwise be warned about each time. Remembers a bounded number.
fn first_warning(what: String) -> bool {
    const REMEMBERED: usize = 4096;
    static WARNED: std::sync::Mutex<Option<std::collections::HashSet<String>>> = std::sync::Mutex::new(None);
    let mut warned = WARNED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let warned = warned.get_or_insert_with(Default::default);
    if warned.len() >= REMEMBERED {
        warned.clear();
    }
    warned.insert(what)
}

/// A pod's prefill/decode settings: its KV connector label, its SGLang
/// bootstrap port and its own config profiles.
fn pod_pd(labels: &BTreeMap<String, String>, annotations: Option<&BTreeMap<String, String>>, pod: &str) -> PodPd {
    let bootstrap_port = match annotations.and_then(|a| a.get(SGLANG_BOOTSTRAP_PORT_ANNOTATION)) {
        None => DEFAULT_SGLANG_BOOTSTRAP_PORT,
        Some(value) => match value.trim().parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => {
                if first_warning(format!("{pod}\0{SGLANG_BOOTSTRAP_PORT_ANNOTATION}\0{value}")) {
                    tracing::warn!(
                        pod,
                        annotation = SGLANG_BOOTSTRAP_PORT_ANNOTATION,
                        value = %value,
                        port = DEFAULT_SGLANG_BOOTSTRAP_PORT,
                        "SGLang bootstrap port is not a port number; using the default"
                    );
                }
                DEFAULT_SGLANG_BOOTSTRAP_PORT
            }
        },
    };
    let profiles = annotations
        .and_then(|a| a.get(CONFIG_ANNOTATION))
        .and_then(|raw| crate::profiles::ModelConfig::parse(raw).ok())
        .map(|config| Arc::new(crate::profiles::PodPdProfiles::of(&config)));
    let kv_connector = labels.get(KV_CONNECTOR_LABEL).cloned();
    if let Some(value) = kv_connector.as_deref()
        && !["shfs", "nixl", "mooncake"].iter().any(|known| value.trim().eq_ignore_ascii_case(known))
        && first_warning(format!("{pod}\0{KV_CONNECTOR_LABEL}\0{value}"))
    {
        tracing::warn!(
            pod,
            label = KV_CONNECTOR_LABEL,
            value,
            "unknown KV connector (shfs, nixl, mooncake); using --kv-connector-type"
        );
    }
    PodPd { kv_connector, bootstrap_port, profiles }
}

/// The path prefixes of a custom-paths annotation, as AIBrix's model router
/// reads them: split at commas, spaces removed, empty and repeated entries
/// dropped. A prefix must start with `/`; others are ignored with a warning.
pub fn custom_paths(value: &str) -> Vec<String> {
    let mut paths: Vec<String> = Vec::new();
    for path in value.split(',').map(|path| path.replace(' ', "")) {
        if path.is_empty() || paths.contains(&path) {
            continue;
        }
        if !path.starts_with('/') {
            if first_warning(format!("{CUSTOM_PATHS_ANNOTATION}\0{path}")) {
                tracing::warn!(path = ?path, "custom path does not start with '/'; ignoring it");
            }
            continue;
        }
        paths.push(path);
    }
    paths
}

/// Whether `path` falls under the path prefix `prefix`, as a Gateway API
/// `PathPrefix` match does: element by element, so `/score` matches
/// `/score` and `/score/x` but not `/scores`.
pub fn under_prefix(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The port in `label`; `default` when it is missing, and (as AIBrix does)
/// when it is not a port number, with a warning naming the pod.
fn port_label(labels: &BTreeMap<String, String>, label: &'static str, pod: &str, default: u16) -> u16 {
    match labels.get(label).map(|value| (value, value.trim().parse::<u16>())) {
        None => default,
        Some((_, Ok(port))) if port > 0 => port,
        Some((value, _)) => {
            if first_warning(format!("{pod}\0{label}\0{value}")) {
                tracing::warn!(pod, label, value = %value, port = default, "port label is not a port number; using the default");
            }
            default
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_parallel_pod_is_one_target_per_rank() {
        let dp = |size: &str| {
            let yaml = format!(
                "{READY}spec:\n  containers:\n  - name: sidecar\n  - name: vllm\n    env:\n    - {{name: data-parallel-size, value: '{size}'}}\n"
            );
            PodInfo::from_pod(&pod(&yaml)).expect("valid").expect("ours")
        };
        let ranks = dp("3").ranks();
        let ports: Vec<_> = ranks.iter().map(|r| (r.key.as_str(), r.addr_text.as_str(), r.metric_port)).collect();
        assert_eq!(
            ports,
            [
                ("ns/p0:9000", "10.0.0.1:9000", 9000),
                ("ns/p0:9001", "10.0.0.1:9001", 9001),
                ("ns/p0:9002", "10.0.0.1:9002", 9002)
            ]
        );
        assert!(ranks.iter().all(|r| r.name == "p0"), "each rank is still named as its pod");
        assert!(!Arc::ptr_eq(&ranks[0].load, &ranks[1].load), "each rank counts its own load");
        let metrics = READY.replace(
            "model.aibrix.ai/port: \"9000\"",
            "model.aibrix.ai/port: \"9000\", model.aibrix.ai/metric-port: \"9100\"",
        );
        let yaml = format!(
            "{metrics}spec:\n  containers:\n  - name: vllm\n    env: [{{name: data-parallel-size, value: '2'}}]\n"
        );
        let ranks = PodInfo::from_pod(&pod(&yaml)).expect("valid").expect("ours").ranks();
        assert_eq!(ranks.iter().map(|r| r.metric_port).collect::<Vec<_>>(), [9100, 9100], "the pod's metrics port");
        for single in ["1", "0", "two", "65"] {
            let ranks = dp(single).ranks();
            assert_eq!((ranks.len(), ranks[0].key.as_str()), (1, "ns/p0"), "{single}");
        }
    }

    #[test]
    fn a_pod_group_index_is_a_number() {
        for (index, served) in [("0", true), ("00", true), (" 0 ", true), ("1", false), ("01", false), ("x", false)] {
            let yaml = READY.replace(
                "role-name: prefill",
                &format!("role-name: prefill, stormservice.orchestration.aibrix.ai/pod-group-index: '{index}'"),
            );
            assert_eq!(PodInfo::from_pod(&pod(&yaml)).expect("valid").is_some(), served, "index {index:?}");
        }
    }

    #[test]
    fn a_bad_setting_is_warned_about_once() {
        let what = || "p9\0model.aibrix.ai/port\0eighty".to_owned();
        assert!(first_warning(what()));
        assert!(!first_warning(what()), "the same pod, setting and value: said already");
        assert!(first_warning("p9\0model.aibrix.ai/port\0ninety".to_owned()), "a new value is news");
    }

    #[test]
    fn custom_paths_read_as_aibrixs_model_router_reads_them() {
        assert_eq!(custom_paths("/f oo, /bar , ,/ba z /,/bar,score"), ["/foo", "/bar", "/baz/"]);
        assert!(under_prefix("/baz", "/baz/") && under_prefix("/baz/x", "/baz/") && under_prefix("/foo", "/foo"));
        assert!(!under_prefix("/foobar", "/foo") && !under_prefix("/fo", "/foo"));
    }

    fn pod(yaml: &str) -> Pod {
        serde_norway::from_str(yaml).expect("pod yaml")
    }

    const READY: &str = r#"
metadata:
  name: p0
  namespace: ns
  labels: {model.aibrix.ai/name: m, model.aibrix.ai/port: "9000", role-name: prefill, roleset-name: rs1}
  annotations: {model.aibrix.ai/config: '{"profiles":{}}'}
status:
  podIP: 10.0.0.1
  conditions: [{type: Ready, status: "True"}]
"#;

    #[test]
    fn ready_pod_with_labels() {
        let info = PodInfo::from_pod(&pod(READY)).expect("valid").expect("ours");
        assert!(info.ready);
        assert_eq!(info.key, "ns/p0");
        assert_eq!(info.model, "m");
        assert_eq!(info.addr_text, "10.0.0.1:9000");
        assert_eq!(info.metric_port, 9000, "metric port defaults to the serving port");
        assert_eq!(info.engine, "vllm");
        assert_eq!(info.role, Role::Prefill);
        assert_eq!(info.roleset.as_deref(), Some("rs1"));
        assert!(info.config_annotation.is_some());
    }

    #[test]
    fn pod_without_model_label_is_not_ours() {
        let p = pod("metadata: {name: x, labels: {app: web}}\nstatus: {podIP: 10.0.0.2}");
        assert!(PodInfo::from_pod(&p).expect("valid").is_none());
    }

    #[test]
    fn model_name_from_annotation_for_names_with_slash() {
        let p = pod("metadata: {name: x, annotations: {model.aibrix.ai/name: org/llama}}");
        let info = PodInfo::from_pod(&p).expect("valid").expect("ours");
        assert_eq!(info.model, "org/llama");
        assert!(!info.ready, "no IP, no conditions");
    }

    #[test]
    fn terminating_or_not_ready_pods_are_not_ready() {
        let terminating =
            READY.replace("namespace: ns", "namespace: ns\n  deletionTimestamp: \"2026-01-01T00:00:00Z\"");
        assert!(!PodInfo::from_pod(&pod(&terminating)).expect("valid").expect("ours").ready);
        let not_ready = READY.replace("status: \"True\"", "status: \"False\"");
        assert!(!PodInfo::from_pod(&pod(&not_ready)).expect("valid").expect("ours").ready);
        let no_ip = READY.replace("podIP: 10.0.0.1", "hostIP: 10.0.0.9");
        assert!(!PodInfo::from_pod(&pod(&no_ip)).expect("valid").expect("ours").ready);
    }

    #[test]
    fn a_bad_port_label_falls_back_to_8000() {
        let bad = READY.replace("\"9000\"", "\"http\"");
        let info = PodInfo::from_pod(&pod(&bad)).expect("valid").expect("ours");
        assert_eq!(info.addr_text, "10.0.0.1:8000");
        assert_eq!(info.metric_port, 8000, "the metrics port follows the serving port");
        let metrics = READY.replace(
            "model.aibrix.ai/port: \"9000\"",
            "model.aibrix.ai/port: \"9000\", model.aibrix.ai/metric-port: \"9100\"",
        );
        let info = PodInfo::from_pod(&pod(&metrics)).expect("valid").expect("ours");
        assert_eq!((info.addr_text.as_str(), info.metric_port), ("10.0.0.1:9000", 9100), "metric-port is honoured");
    }

    #[test]
    fn ray_workers_and_later_pod_groups_are_not_routed_to() {
        let with_label = |label: &str| READY.replace("role-name: prefill", &format!("role-name: prefill, {label}"));
        for skipped in ["ray.io/node-type: worker", "stormservice.orchestration.aibrix.ai/pod-group-index: \"1\""] {
            assert_eq!(
                PodInfo::from_pod(&pod(&with_label(skipped))).expect("valid").map(|p| p.name),
                None,
                "{skipped}"
            );
        }
        for served in ["ray.io/node-type: head", "stormservice.orchestration.aibrix.ai/pod-group-index: \"0\""] {
            assert!(PodInfo::from_pod(&pod(&with_label(served))).expect("valid").is_some(), "{served}");
        }
    }

    #[test]
    fn in_flight_guard_counts_down_on_drop() {
        let load = Arc::new(PodLoad::default());
        let a = load.start();
        let b = load.start();
        assert_eq!(load.in_flight(), 2);
        drop(a);
        assert_eq!(load.in_flight(), 1);
        drop(b);
        assert_eq!(load.in_flight(), 0);
    }

    #[test]
    fn routing_load_adds_what_the_rest_of_the_fleet_has_running() {
        let load = Arc::new(PodLoad::default());
        let _a = load.start();
        assert_eq!(load.routing_load(), 1, "alone: its own count");
        // The engine ran 6 when this replica had 1 in flight; 2 more started since.
        load.engine_reading(6, 1, Duration::from_secs(60));
        let (_b, _c) = (load.start(), load.start());
        assert_eq!(load.routing_load(), 8, "the engine's count moved by this replica's starts");
        load.engine_reading(0, 3, Duration::from_secs(60));
        assert_eq!(load.routing_load(), 3, "never below its own count");
        load.others_in_flight(4, Duration::from_secs(60));
        assert_eq!(load.routing_load(), 7, "its own plus what the other replicas said");
        load.engine_reading(9, 3, Duration::from_secs(60));
        assert_eq!(load.routing_load(), 9, "or the engine's count, when more");
        load.others_in_flight(9, Duration::ZERO);
        load.engine_reading(6, 1, Duration::ZERO);
        assert_eq!(load.routing_load(), 3, "lapsed views count no more");
    }

    #[test]
    fn the_engines_reading_moves_with_the_other_replicas_reported_ends() {
        let load = Arc::new(PodLoad::default());
        let _a = load.start();
        load.others_in_flight(5, Duration::from_secs(60));
        // The engine ran 9: this replica's 1, the others' 5, and 3 nobody reports.
        load.engine_reading(9, 1, Duration::from_secs(60));
        assert_eq!(load.routing_load(), 9);
        // Three of the others' requests end, as they say: the pod is less busy now.
        load.others_in_flight(2, Duration::from_secs(60));
        assert_eq!(load.routing_load(), 6, "1 own + 2 others' + 3 unreported");
        load.others_in_flight(0, Duration::ZERO);
        load.others_in_flight(2, Duration::ZERO);
        assert_eq!(load.routing_load(), 9, "not hearing the others: the reading as it came");
        // A reading taken while not hearing them is not moved once they are heard again.
        load.engine_reading(9, 1, Duration::from_secs(60));
        load.others_in_flight(5, Duration::from_secs(60));
        assert_eq!(load.routing_load(), 9);
        // A replica holding 3 goes silent: the sum falls by its count, not by ends.
        load.engine_reading(9, 1, Duration::from_secs(60));
        load.others_changed();
        load.others_in_flight(2, Duration::from_secs(60));
        assert_eq!(load.routing_load(), 9, "the silent replica's requests still count");
    }
}
