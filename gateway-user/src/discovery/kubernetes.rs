//! Discovery from the Kubernetes API: a kube-rs watcher on Pods carrying the
//! `model.aibrix.ai/name` label, in one namespace or all of them.
//!
//! Every event is applied to the full set of pods the watcher has delivered,
//! and that set replaces the pod store's contents, exactly as a pods-file
//! reload does: in-flight counters, readiness-transition metrics and config
//! profiles then behave the same for both sources. It costs O(pods) per
//! event, which is nothing next to a request.
//!
//! A (re)list is buffered from `Init` to `InitDone`, so the store never holds
//! half a list and `/readyz` turns ready only after the first complete one.
//! When the watch breaks, kube-rs resumes it from the last resourceVersion or,
//! after `410 Gone`, lists again, with backoff; routing continues from the
//! last known pods meanwhile.
//!
//! The same client and namespace scope also watch AIBrix's `ModelAdapter`
//! resources ([`model_adapters`](super::model_adapters)), on their own: they
//! never hold back readiness, and a cluster without them only logs why.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use http::{Request, Response};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use tokio_util::sync::CancellationToken;

use super::pod::{MODEL_NAME_LABEL, PodInfo};
use super::store::PodStore;
use crate::metrics::{DiscoveryEvent, Metrics};

/// `source` label of this discovery source's metrics.
const SOURCE: &str = "kubernetes";

/// At most one log line per this interval while the watch keeps failing.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Why Kubernetes discovery cannot start at all.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    /// Displays its cause inline: kube's error already spells out both
    /// attempts (in-cluster and kubeconfig), and its source chain repeats them.
    #[error(
        "no Kubernetes API config: set KUBECONFIG (or provide ~/.kube/config), or run in a pod with a service account: {0}"
    )]
    Config(kube::config::InferConfigError),
    #[error("cannot build a Kubernetes API client")]
    Client(#[source] kube::Error),
}

/// Starts watching pods in `namespace` (all namespaces when `None` or empty)
/// and feeding `store` until `shutdown`. Fails at once without a usable
/// cluster config; an unreachable API server is retried in the background,
/// and the gateway stays not ready until the first complete list.
pub async fn spawn(
    namespace: Option<String>,
    store: Arc<PodStore>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), KubernetesError> {
    let config = kube::Config::infer().await.map_err(KubernetesError::Config)?;
    let server = config.cluster_url.to_string();
    let client = kube::client::ClientBuilder::try_from(config)
        .map_err(KubernetesError::Client)?
        .with_layer(&WatchEstablishedLayer { metrics: Arc::clone(&metrics) })
        .build();
    let namespace = namespace.map(|ns| ns.trim().to_owned()).filter(|ns| !ns.is_empty());
    let api: Api<Pod> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    tracing::info!(
        server = %server,
        namespace = namespace.as_deref().unwrap_or("<all>"),
        selector = MODEL_NAME_LABEL,
        "watching pods"
    );
    metrics.discovery.watch_started();
    super::model_adapters::spawn(client, namespace.as_deref(), Arc::clone(&store), shutdown.clone());
    tokio::spawn(run(api, store, metrics, shutdown));
    Ok(())
}

/// Applies watcher events to the store until shutdown.
async fn run(api: Api<Pod>, store: Arc<PodStore>, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let config = watcher::Config::default().labels(MODEL_NAME_LABEL);
    let mut events = std::pin::pin!(watcher::watcher(api, config).default_backoff());
    let mut pods = PodSet::default();
    let mut errors = ErrorLog::new(ERROR_LOG_INTERVAL);
    loop {
        let next = tokio::select! {
            next = events.next() => next,
            () = shutdown.cancelled() => return,
        };
        match next {
            Some(Ok(event)) => {
                if let Some(kind) = event_kind(&event) {
                    metrics.discovery.event(SOURCE, kind);
                }
                let list_done = matches!(event, Event::InitDone);
                if !pods.apply(event) {
                    continue;
                }
                store.replace_all(pods.pods());
                metrics.discovery.synced();
                if errors.recovered() {
                    tracing::info!("kubernetes pod watch recovered");
                }
                if list_done {
                    tracing::info!(pods = pods.len(), ready = pods.ready(), "kubernetes pod list loaded");
                }
            }
            Some(Err(err)) => {
                metrics.discovery.event(SOURCE, DiscoveryEvent::Error);
                metrics.discovery.sync_failed();
                if let Some(suppressed) = errors.failure(Instant::now()) {
                    tracing::warn!(error = %err, suppressed,
                        "kubernetes pod watch failed; retrying with backoff, routing continues from the last known pods");
                }
            }
            None => {
                // kube's watcher never ends by itself; say so loudly if it does.
                tracing::error!("kubernetes pod watch ended; pods are no longer updated");
                return;
            }
        }
    }
}

/// The metric kind of a watcher event; `None` for list bookkeeping.
fn event_kind(event: &Event<Pod>) -> Option<DiscoveryEvent> {
    match event {
        Event::Apply(_) => Some(DiscoveryEvent::Applied),
        Event::Delete(_) => Some(DiscoveryEvent::Deleted),
        Event::InitDone => Some(DiscoveryEvent::Relist),
        Event::Init | Event::InitApply(_) => None,
    }
}

/// What one watcher has delivered, an entry per object keyed by
/// `namespace/name`. A (re)list is buffered from `Init` to `InitDone`, the
/// current set staying in force until the list is complete.
pub(super) struct Watched<V> {
    pub(super) current: BTreeMap<String, V>,
    listing: Option<BTreeMap<String, V>>,
    /// A complete list has been seen: only then is the set worth publishing.
    listed: bool,
}

impl<V> Default for Watched<V> {
    fn default() -> Self {
        Self { current: BTreeMap::new(), listing: None, listed: false }
    }
}

impl<V> Watched<V> {
    /// Applies one event, `entry` making an object's entry from its key and
    /// the object (`None`: the object is not kept); true when the set should
    /// now be published.
    pub(super) fn apply<K: kube::Resource>(&mut self, event: Event<K>, entry: impl Fn(&str, &K) -> Option<V>) -> bool {
        let put = |set: &mut BTreeMap<String, V>, object: &K| {
            let key = object_key(object);
            match entry(&key, object) {
                Some(value) => set.insert(key, value),
                None => set.remove(&key),
            };
        };
        match event {
            Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            Event::InitApply(object) => {
                put(self.listing.get_or_insert_with(BTreeMap::new), &object);
                false
            }
            Event::InitDone => {
                // Objects missing from the new list were deleted while the watch was down.
                self.current = self.listing.take().unwrap_or_default();
                self.listed = true;
                true
            }
            Event::Apply(object) => {
                put(&mut self.current, &object);
                self.listed
            }
            Event::Delete(object) => {
                self.current.remove(&object_key(&object));
                self.listed
            }
        }
    }
}

/// `namespace/name`, as [`PodInfo::key`] spells it for pods.
fn object_key<K: kube::Resource>(object: &K) -> String {
    let meta = object.meta();
    format!("{}/{}", meta.namespace.as_deref().unwrap_or("default"), meta.name.as_deref().unwrap_or_default())
}

/// The pods the watcher has delivered.
#[derive(Default)]
struct PodSet(Watched<PodInfo>);

impl PodSet {
    /// Applies one event; true when the store should now get [`PodSet::pods`].
    /// A pod that is no longer usable leaves the set.
    fn apply(&mut self, event: Event<Pod>) -> bool {
        self.0.apply(event, |key, pod| match PodInfo::from_pod(pod) {
            Ok(info) => info,
            Err(err) => {
                tracing::warn!(pod = %key, error = %err, "skipping pod");
                None
            }
        })
    }

    fn pods(&self) -> Vec<PodInfo> {
        self.0.current.values().cloned().collect()
    }

    fn len(&self) -> usize {
        self.0.current.len()
    }

    fn ready(&self) -> usize {
        self.0.current.values().filter(|p| p.ready).count()
    }
}

/// Keeps a failing watch from flooding the log: the first failure is logged
/// at once, later ones at most once per interval with the count in between.
pub(super) struct ErrorLog {
    interval: Duration,
    last_logged: Option<Instant>,
    suppressed: u64,
    failing: bool,
}

impl ErrorLog {
    pub(super) fn new(interval: Duration) -> Self {
        Self { interval, last_logged: None, suppressed: 0, failing: false }
    }

    /// Records a failure; `Some(failures not logged since the last line)`
    /// when this one should be logged.
    pub(super) fn failure(&mut self, now: Instant) -> Option<u64> {
        self.failing = true;
        let due = self.last_logged.is_none_or(|at| now.duration_since(at) >= self.interval);
        if !due {
            self.suppressed += 1;
            return None;
        }
        self.last_logged = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }

    /// True once after a run of failures, when the watch works again.
    pub(super) fn recovered(&mut self) -> bool {
        std::mem::take(&mut self.failing)
    }
}

/// Marks the pod view current whenever the API server accepts a watch of
/// pods (the client is shared with the `ModelAdapter` watcher, whose watches
/// say nothing about pods). kube's watcher resumes a dropped watch without
/// emitting anything; without this, a quiet cluster would look stale after
/// any transient error until the next pod changed.
struct WatchEstablishedLayer {
    metrics: Arc<Metrics>,
}

impl<S> tower::Layer<S> for WatchEstablishedLayer {
    type Service = WatchEstablished<S>;

    fn layer(&self, inner: S) -> Self::Service {
        WatchEstablished { inner, metrics: Arc::clone(&self.metrics) }
    }
}

struct WatchEstablished<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<Request<kube::client::Body>> for WatchEstablished<S>
where
    S: tower::Service<Request<kube::client::Body>, Response = Response<B>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    B: 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<B>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<kube::client::Body>) -> Self::Future {
        let is_watch = request.uri().path().ends_with("/pods")
            && request.uri().query().is_some_and(|q| q.split('&').any(|pair| pair == "watch=true"));
        let response = self.inner.call(request);
        let metrics = Arc::clone(&self.metrics);
        Box::pin(async move {
            let response = response.await?;
            if is_watch && response.status().is_success() {
                metrics.discovery.synced();
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready: bool) -> Pod {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": "1",
                         "labels": {"model.aibrix.ai/name": "m", "model.aibrix.ai/port": "9000"}},
            "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .expect("pod json");
        if !ready {
            pod.status.as_mut().and_then(|s| s.conditions.as_mut()).expect("conditions")[0].status = "False".into();
        }
        pod
    }

    fn names(set: &PodSet) -> Vec<String> {
        set.pods().iter().map(|p| format!("{}:{}", p.name, if p.ready { "ready" } else { "not-ready" })).collect()
    }

    fn store() -> PodStore {
        PodStore::new(Arc::new(Metrics::new()))
    }

    /// Feeds events the way `run` does.
    fn feed(set: &mut PodSet, store: &PodStore, events: Vec<Event<Pod>>) {
        for event in events {
            if set.apply(event) {
                store.replace_all(set.pods());
            }
        }
    }

    #[test]
    fn initial_list_is_buffered_until_init_done() {
        let (mut set, store) = (PodSet::default(), store());
        feed(&mut set, &store, vec![Event::Init, Event::InitApply(pod("a", true)), Event::InitApply(pod("b", false))]);
        assert!(!store.is_synced(), "half a list must not make the gateway ready");
        assert!(store.snapshot().model("m").is_none());

        feed(&mut set, &store, vec![Event::InitDone]);
        assert!(store.is_synced());
        let snap = store.snapshot();
        let model = snap.model("m").expect("model m");
        assert_eq!(model.pods.len(), 2);
        assert_eq!(model.ready.iter().map(|p| p.key.as_str()).collect::<Vec<_>>(), ["ns/a"]);
    }

    #[test]
    fn relist_keeps_serving_the_old_set_until_done_and_drops_vanished_pods() {
        let (mut set, store) = (PodSet::default(), store());
        feed(&mut set, &store, vec![Event::Init, Event::InitApply(pod("a", true)), Event::InitDone]);
        // A re-list after 410 Gone: pod a vanished while the watch was down.
        feed(&mut set, &store, vec![Event::Init, Event::InitApply(pod("b", true))]);
        assert_eq!(store.snapshot().model("m").expect("m").pods[0].name, "a", "old set until InitDone");
        feed(&mut set, &store, vec![Event::InitDone]);
        assert_eq!(names(&set), ["b:ready"]);
        assert_eq!(store.snapshot().model("m").expect("m").pods[0].name, "b");
    }

    #[test]
    fn watch_events_apply_readiness_and_deletes() {
        let (mut set, store) = (PodSet::default(), store());
        feed(&mut set, &store, vec![Event::Init, Event::InitDone]);
        assert!(store.is_synced(), "an empty list is a complete list");

        feed(&mut set, &store, vec![Event::Apply(pod("a", true)), Event::Apply(pod("b", true))]);
        assert_eq!(store.snapshot().model("m").expect("m").ready.len(), 2);

        feed(&mut set, &store, vec![Event::Apply(pod("a", false))]);
        assert_eq!(names(&set), ["a:not-ready", "b:ready"]);
        assert_eq!(store.snapshot().model("m").expect("m").ready.len(), 1);

        feed(&mut set, &store, vec![Event::Delete(pod("b", true))]);
        assert_eq!(names(&set), ["a:not-ready"]);
        assert!(store.snapshot().model("m").expect("m").ready.is_empty());

        feed(&mut set, &store, vec![Event::Delete(pod("a", false))]);
        assert!(store.snapshot().model("m").is_none(), "a model without pods is gone");
    }

    #[test]
    fn terminating_pod_leaves_the_routable_set_at_once() {
        let (mut set, store) = (PodSet::default(), store());
        feed(&mut set, &store, vec![Event::Init, Event::InitApply(pod("a", true)), Event::InitDone]);
        let mut terminating = pod("a", true);
        terminating.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-01-01T00:00:00Z".parse().expect("timestamp"),
        ));
        feed(&mut set, &store, vec![Event::Apply(terminating)]);
        let snap = store.snapshot();
        let model = snap.model("m").expect("still known while terminating");
        assert!(model.ready.is_empty(), "a pod with a deletionTimestamp takes no new requests");
    }

    #[test]
    fn in_flight_count_survives_watch_updates() {
        let (mut set, store) = (PodSet::default(), store());
        feed(&mut set, &store, vec![Event::Init, Event::InitApply(pod("a", true)), Event::InitDone]);
        let guard = store.snapshot().model("m").expect("m").ready[0].load.start();
        feed(&mut set, &store, vec![Event::Apply(pod("a", false)), Event::Init, Event::InitApply(pod("a", true))]);
        feed(&mut set, &store, vec![Event::InitDone]);
        assert_eq!(store.snapshot().model("m").expect("m").pods[0].load.in_flight(), 1);
        drop(guard);
        assert_eq!(store.snapshot().model("m").expect("m").pods[0].load.in_flight(), 0);
    }

    #[test]
    fn unusable_or_unlabelled_pods_leave_the_set() {
        let mut set = PodSet::default();
        set.apply(Event::Init);
        set.apply(Event::InitApply(pod("a", true)));
        set.apply(Event::InitApply(pod("b", true)));
        set.apply(Event::InitDone);
        let mut ray_worker = pod("a", true);
        ray_worker.metadata.labels.as_mut().expect("labels").insert("ray.io/node-type".into(), "worker".into());
        let mut unlabelled = pod("b", true);
        unlabelled.metadata.labels = None;
        assert!(set.apply(Event::Apply(ray_worker)));
        assert!(set.apply(Event::Apply(unlabelled)));
        assert!(set.pods().is_empty());
    }

    #[test]
    fn readiness_flips_are_counted_per_model_and_pod() {
        let metrics = Arc::new(Metrics::new());
        let store = PodStore::new(Arc::clone(&metrics));
        let mut set = PodSet::default();
        feed(&mut set, &store, vec![Event::Init, Event::InitApply(pod("a", true)), Event::InitDone]);
        feed(&mut set, &store, vec![Event::Apply(pod("a", false)), Event::Apply(pod("a", true))]);
        let text = metrics.render();
        for ready in ["false", "true"] {
            let line =
                format!(r#"aibrix_gateway_pod_readiness_transitions_total{{model="m",pod="ns/a",ready="{ready}"}} 1"#);
            assert!(text.contains(&line), "{line} missing:\n{text}");
        }
    }

    #[test]
    fn event_kinds_for_metrics() {
        assert_eq!(event_kind(&Event::Apply(pod("a", true))), Some(DiscoveryEvent::Applied));
        assert_eq!(event_kind(&Event::Delete(pod("a", true))), Some(DiscoveryEvent::Deleted));
        assert_eq!(event_kind(&Event::InitDone), Some(DiscoveryEvent::Relist));
        assert_eq!(event_kind(&Event::Init), None);
        assert_eq!(event_kind(&Event::InitApply(pod("a", true))), None);
    }

    #[test]
    fn error_log_is_rate_limited_and_reports_recovery_once() {
        let mut log = ErrorLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(!log.recovered(), "nothing failed yet");
        assert_eq!(log.failure(t0), Some(0));
        assert_eq!(log.failure(t0 + Duration::from_secs(1)), None);
        assert_eq!(log.failure(t0 + Duration::from_secs(2)), None);
        assert_eq!(log.failure(t0 + Duration::from_secs(10)), Some(2), "two failures were not logged");
        assert!(log.recovered());
        assert!(!log.recovered(), "recovery is reported once");
    }
}
