//! AIBrix's `ModelAdapter` resources (`model.aibrix.ai/v1alpha1`), watched
//! with `--discovery kubernetes` next to the pods, with the same client and
//! namespace scope.
//!
//! Each resource is one LoRA adapter: `metadata.name` is the model name
//! requests use, `status.instances` the pods of its namespace that have
//! loaded it (kept by AIBrix's controller), `spec.baseModel` (optional) the
//! model those pods serve, and its own `model.aibrix.ai/config` annotation
//! (optional) the adapter's profiles. AIBrix's gateway cache maps them the
//! same way. After each applied change, the bindings of every resource
//! replace [`AdapterSource::ModelAdapter`]'s in the store; a (re)list is
//! buffered from `Init` to `InitDone`, as the pods' is.
//!
//! The resource is optional. A cluster without AIBrix's CRD answers 404, a
//! service account without the RBAC rule 403: one warning then says that
//! adapters from `ModelAdapter` resources are off and why, and the watch is
//! retried with kube's default backoff without further noise (a reminder
//! every ten minutes). Pod discovery and readiness never wait for it.
//!
//! The objects are read as kube's `DynamicObject` through an `ApiResource`
//! built from the group, version, kind and plural: no generated type, no
//! derive, no further crate.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use tokio_util::sync::CancellationToken;

use super::adapters::{AdapterBinding, AdapterSource};
use super::kubernetes::{ErrorLog, Watched};
use super::pod::CONFIG_ANNOTATION;
use super::store::PodStore;

pub const GROUP: &str = "model.aibrix.ai";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "ModelAdapter";
pub const PLURAL: &str = "modeladapters";

/// At most one log line per this interval while the watch keeps failing.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// While the resource stays unserved or forbidden, a reminder at most this often.
const OFF_REMINDER_INTERVAL: Duration = Duration::from_secs(600);

/// The `ModelAdapter` resource, as kube's dynamic API addresses it.
pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, KIND), PLURAL)
}

/// Starts watching `ModelAdapter` resources in `namespace` (all namespaces
/// when `None`) and feeding their bindings to `store` until `shutdown`.
pub(super) fn spawn(client: kube::Client, namespace: Option<&str>, store: Arc<PodStore>, shutdown: CancellationToken) {
    let resource = api_resource();
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client, ns, &resource),
        None => Api::all_with(client, &resource),
    };
    tracing::info!(
        namespace = namespace.unwrap_or("<all>"),
        resource = %format_args!("{PLURAL}.{GROUP}/{VERSION}"),
        "watching ModelAdapter resources for LoRA adapters"
    );
    tokio::spawn(run(api, store, shutdown));
}

/// Applies watcher events to the store's `ModelAdapter` bindings until shutdown.
async fn run(api: Api<DynamicObject>, store: Arc<PodStore>, shutdown: CancellationToken) {
    let mut events = std::pin::pin!(watcher::watcher(api, watcher::Config::default()).default_backoff());
    let mut adapters = AdapterSet::default();
    let mut errors = ErrorLog::new(ERROR_LOG_INTERVAL);
    let mut availability = Availability::default();
    loop {
        let next = tokio::select! {
            next = events.next() => next,
            () = shutdown.cancelled() => return,
        };
        match next {
            Some(Ok(event)) => {
                // kube emits `Init` before it lists: only later events prove the API answered.
                if !matches!(event, Event::Init) {
                    if availability.served() {
                        tracing::info!("ModelAdapter resources are served now: adapters from them are on");
                    }
                    if errors.recovered() {
                        tracing::info!("kubernetes ModelAdapter watch recovered");
                    }
                }
                let list_done = matches!(event, Event::InitDone);
                if adapters.apply(event) {
                    store.set_adapters(AdapterSource::ModelAdapter, adapters.bindings());
                }
                if list_done {
                    tracing::info!(adapters = adapters.len(), "kubernetes ModelAdapter list loaded");
                }
            }
            Some(Err(err)) => match Unserved::of(&err) {
                Some(why) => {
                    match availability.failure(why, Instant::now()) {
                        Some(OffLog::Off) => tracing::warn!(error = %err,
                            "adapters from ModelAdapter resources are off: {}; pods are discovered as usual, \
                             and the watch is retried quietly", why.reason()),
                        Some(OffLog::StillOff { suppressed }) => tracing::info!(
                            suppressed,
                            "adapters from ModelAdapter resources are still off: {}",
                            why.reason()
                        ),
                        None => {}
                    }
                    // No resource type, no objects: adapters known from before it went are gone.
                    if why == Unserved::NotFound && adapters.clear() {
                        store.set_adapters(AdapterSource::ModelAdapter, Vec::new());
                    }
                }
                None => {
                    if let Some(suppressed) = errors.failure(Instant::now()) {
                        tracing::warn!(error = %err, suppressed,
                            "kubernetes ModelAdapter watch failed; retrying with backoff, adapters stay as last known");
                    }
                }
            },
            None => {
                // kube's watcher never ends by itself; say so loudly if it does.
                tracing::error!("kubernetes ModelAdapter watch ended; adapters from it are no longer updated");
                return;
            }
        }
    }
}

/// Why the API server will not serve `ModelAdapter` resources to the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unserved {
    /// 404: the CRD is not installed.
    NotFound,
    /// 403: the service account lacks the RBAC rule.
    Forbidden,
}

impl Unserved {
    fn of(err: &watcher::Error) -> Option<Self> {
        let code = match err {
            watcher::Error::InitialListFailed(err)
            | watcher::Error::WatchStartFailed(err)
            | watcher::Error::WatchFailed(err) => match err {
                kube::Error::Api(status) => status.code,
                _ => return None,
            },
            watcher::Error::WatchError(status) => status.code,
            watcher::Error::NoResourceVersion => return None,
        };
        match code {
            404 => Some(Self::NotFound),
            403 => Some(Self::Forbidden),
            _ => None,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Self::NotFound => {
                "the API server does not serve modeladapters.model.aibrix.ai/v1alpha1 (AIBrix's ModelAdapter CRD is not installed)"
            }
            Self::Forbidden => {
                "the gateway may not list and watch modeladapters.model.aibrix.ai (its RBAC lacks the rule of deploy/rbac)"
            }
        }
    }
}

/// What to log about an unserved resource.
#[derive(Debug, PartialEq, Eq)]
enum OffLog {
    /// It just went off: the one warning.
    Off,
    /// Still off, a reminder; `suppressed` failures were not logged since the last line.
    StillOff { suppressed: u64 },
}

/// Whether the resource is off, and when that was last said.
#[derive(Default)]
struct Availability {
    off: Option<Unserved>,
    last_logged: Option<Instant>,
    suppressed: u64,
}

impl Availability {
    /// Records a 404 or 403; what to log about it, if anything.
    fn failure(&mut self, why: Unserved, now: Instant) -> Option<OffLog> {
        if self.off.replace(why).is_none() {
            self.last_logged = Some(now);
            self.suppressed = 0;
            return Some(OffLog::Off);
        }
        if self.last_logged.is_some_and(|at| now.duration_since(at) < OFF_REMINDER_INTERVAL) {
            self.suppressed += 1;
            return None;
        }
        self.last_logged = Some(now);
        Some(OffLog::StillOff { suppressed: std::mem::take(&mut self.suppressed) })
    }

    /// True once when the API answers again after being off.
    fn served(&mut self) -> bool {
        self.off.take().is_some()
    }
}

/// The bindings of every `ModelAdapter` the watcher has delivered.
#[derive(Default)]
struct AdapterSet(Watched<Vec<AdapterBinding>>);

impl AdapterSet {
    /// Applies one event; true when the store should now get [`AdapterSet::bindings`].
    fn apply(&mut self, event: Event<DynamicObject>) -> bool {
        self.0.apply(event, |_, adapter| Some(bindings_of(adapter)))
    }

    /// Forgets every resource; true when some were known.
    fn clear(&mut self) -> bool {
        let known = !self.0.current.is_empty();
        self.0.current.clear();
        known
    }

    fn bindings(&self) -> Vec<AdapterBinding> {
        self.0.current.values().flatten().cloned().collect()
    }

    fn len(&self) -> usize {
        self.0.current.len()
    }
}

/// One binding per pod in `status.instances` (names of pods in the
/// resource's namespace), each naming `spec.baseModel` as the parent.
fn bindings_of(adapter: &DynamicObject) -> Vec<AdapterBinding> {
    let Some(name) = adapter.metadata.name.as_deref().filter(|name| !name.is_empty()) else {
        return Vec::new();
    };
    let namespace = adapter.metadata.namespace.as_deref().unwrap_or("default");
    let parent = adapter.data["spec"]["baseModel"].as_str().map(str::trim).filter(|base| !base.is_empty());
    let config_annotation = adapter.metadata.annotations.as_ref().and_then(|a| a.get(CONFIG_ANNOTATION));
    let instances: BTreeSet<&str> = adapter.data["status"]["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_str)
        .filter(|pod| !pod.is_empty())
        .collect();
    instances
        .into_iter()
        .map(|pod| AdapterBinding {
            adapter: name.to_owned(),
            parent: parent.map(str::to_owned),
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            key: None,
            config_annotation: config_annotation.cloned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::store::tests::test_pod;
    use crate::metrics::Metrics;

    fn adapter(name: &str, base: Option<&str>, instances: &[&str]) -> DynamicObject {
        let mut spec = serde_json::json!({"artifactURL": format!("huggingface://org/{name}")});
        if let Some(base) = base {
            spec["baseModel"] = base.into();
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "model.aibrix.ai/v1alpha1",
            "kind": "ModelAdapter",
            "metadata": {"name": name, "namespace": "default", "resourceVersion": "1"},
            "spec": spec,
            "status": {"phase": "Running", "instances": instances},
        }))
        .expect("ModelAdapter json")
    }

    /// A store with pods p0..p2 of `llama` and q0 of `qwen`, all ready.
    fn store() -> PodStore {
        let store = PodStore::new(Arc::new(Metrics::new()));
        store.replace_all(vec![
            test_pod("llama", "p0", 1, true),
            test_pod("llama", "p1", 2, true),
            test_pod("llama", "p2", 3, true),
            test_pod("qwen", "q0", 4, true),
        ]);
        store
    }

    /// Feeds events the way `run` does.
    fn feed(set: &mut AdapterSet, store: &PodStore, events: Vec<Event<DynamicObject>>) {
        for event in events {
            if set.apply(event) {
                store.set_adapters(AdapterSource::ModelAdapter, set.bindings());
            }
        }
    }

    /// The pods `model` routes to, or `None` when it is no model.
    fn pods(store: &PodStore, model: &str) -> Option<Vec<String>> {
        store.snapshot().model(model).map(|m| m.pods.iter().map(|p| p.name.clone()).collect())
    }

    #[test]
    fn api_resource_addresses_aibrix_model_adapters() {
        let resource = api_resource();
        assert_eq!(resource.api_version, "model.aibrix.ai/v1alpha1");
        assert_eq!(resource.kind, "ModelAdapter");
        assert_eq!(resource.plural, "modeladapters");
    }

    #[test]
    fn instances_become_bindings_with_the_base_model_and_own_config() {
        let mut object = adapter("sql", Some("llama"), &["p2", "p0", "p2", ""]);
        let bindings = bindings_of(&object);
        let pods: Vec<&str> = bindings.iter().map(|b| b.pod.as_str()).collect();
        assert_eq!(pods, ["p0", "p2"], "sorted, repeats and empty names dropped");
        assert!(bindings.iter().all(|b| b.adapter == "sql" && b.namespace == "default" && b.key.is_none()));
        assert!(bindings.iter().all(|b| b.parent.as_deref() == Some("llama") && b.config_annotation.is_none()));

        let config = r#"{"profiles":{"default":{"routingStrategy":"random"}}}"#;
        object.metadata.annotations = Some([(CONFIG_ANNOTATION.to_owned(), config.to_owned())].into());
        assert!(bindings_of(&object).iter().all(|b| b.config_annotation.as_deref() == Some(config)));

        assert!(bindings_of(&adapter("sql", None, &["p0"]))[0].parent.is_none(), "no baseModel: the pod's model");
        let mut pending = adapter("sql", Some("llama"), &[]);
        assert!(bindings_of(&pending).is_empty());
        pending.data["status"] = serde_json::Value::Null;
        assert!(bindings_of(&pending).is_empty(), "no status yet");
    }

    #[test]
    fn initial_list_is_buffered_until_init_done() {
        let (mut set, store) = (AdapterSet::default(), store());
        feed(&mut set, &store, vec![Event::Init, Event::InitApply(adapter("sql", Some("llama"), &["p0", "p2"]))]);
        assert!(pods(&store, "sql").is_none(), "half a list is not published");
        feed(&mut set, &store, vec![Event::InitDone]);
        assert_eq!(pods(&store, "sql"), Some(vec!["p0".to_owned(), "p2".to_owned()]));
        assert_eq!(store.snapshot().model("sql").expect("sql").parent.as_deref(), Some("llama"));
    }

    #[test]
    fn watch_events_move_and_remove_adapters() {
        let (mut set, store) = (AdapterSet::default(), store());
        feed(&mut set, &store, vec![Event::Apply(adapter("early", None, &["p0"]))]);
        assert!(pods(&store, "early").is_none(), "nothing is published before the first complete list");
        feed(&mut set, &store, vec![Event::Init, Event::InitDone]);

        feed(&mut set, &store, vec![Event::Apply(adapter("sql", Some("llama"), &["p0", "p2"]))]);
        assert_eq!(pods(&store, "sql"), Some(vec!["p0".to_owned(), "p2".to_owned()]));
        feed(&mut set, &store, vec![Event::Apply(adapter("sql", Some("llama"), &["p1"]))]);
        assert_eq!(pods(&store, "sql"), Some(vec!["p1".to_owned()]), "the instances replace the old ones");

        // A base model the pods do not serve, or no instance left: no model.
        feed(&mut set, &store, vec![Event::Apply(adapter("chat", Some("qwen"), &["p0"]))]);
        assert!(pods(&store, "chat").is_none());
        feed(&mut set, &store, vec![Event::Apply(adapter("sql", Some("llama"), &[]))]);
        assert!(pods(&store, "sql").is_none());

        feed(&mut set, &store, vec![Event::Apply(adapter("sql", None, &["p1", "q0"]))]);
        assert_eq!(pods(&store, "sql"), Some(vec!["p1".to_owned(), "q0".to_owned()]), "no baseModel: any model");
        feed(&mut set, &store, vec![Event::Delete(adapter("sql", None, &["p1", "q0"]))]);
        assert!(pods(&store, "sql").is_none(), "deleted");
        assert_eq!(store.snapshot().model_names(), ["llama", "qwen"]);
    }

    #[test]
    fn relist_keeps_the_old_set_until_done_and_drops_vanished_adapters() {
        let (mut set, store) = (AdapterSet::default(), store());
        feed(&mut set, &store, vec![Event::Init, Event::InitApply(adapter("a", None, &["p0"])), Event::InitDone]);
        feed(&mut set, &store, vec![Event::Init, Event::InitApply(adapter("b", None, &["p1"]))]);
        assert!(pods(&store, "a").is_some() && pods(&store, "b").is_none(), "old set until InitDone");
        feed(&mut set, &store, vec![Event::InitDone]);
        assert!(pods(&store, "a").is_none(), "a vanished while the watch was down");
        assert_eq!(pods(&store, "b"), Some(vec!["p1".to_owned()]));
        assert_eq!(set.len(), 1);

        assert!(set.clear(), "the CRD went away: its objects with it");
        assert!(!set.clear());
        assert!(set.bindings().is_empty());
    }

    #[test]
    fn not_found_and_forbidden_are_told_apart_from_other_failures() {
        let api = |code: u16| kube::Error::Api(kube::core::Status::failure("x", "y").with_code(code).boxed());
        assert_eq!(Unserved::of(&watcher::Error::InitialListFailed(api(404))), Some(Unserved::NotFound));
        assert_eq!(Unserved::of(&watcher::Error::WatchStartFailed(api(403))), Some(Unserved::Forbidden));
        assert_eq!(Unserved::of(&watcher::Error::WatchFailed(api(403))), Some(Unserved::Forbidden));
        let gone = kube::core::Status::failure("too old", "Expired").with_code(410).boxed();
        assert_eq!(Unserved::of(&watcher::Error::WatchError(gone)), None);
        assert_eq!(Unserved::of(&watcher::Error::InitialListFailed(api(500))), None);
        assert_eq!(Unserved::of(&watcher::Error::NoResourceVersion), None);
    }

    #[test]
    fn an_unserved_resource_is_warned_about_once_then_reminded_rarely() {
        let mut availability = Availability::default();
        let t0 = Instant::now();
        assert!(!availability.served(), "never off");
        assert_eq!(availability.failure(Unserved::NotFound, t0), Some(OffLog::Off));
        for secs in [1, 30, 60, 599] {
            assert_eq!(availability.failure(Unserved::NotFound, t0 + Duration::from_secs(secs)), None);
        }
        assert_eq!(
            availability.failure(Unserved::Forbidden, t0 + OFF_REMINDER_INTERVAL),
            Some(OffLog::StillOff { suppressed: 4 })
        );
        assert_eq!(availability.failure(Unserved::NotFound, t0 + OFF_REMINDER_INTERVAL), None);
        assert!(availability.served());
        assert!(!availability.served(), "told once");
        let later = t0 + OFF_REMINDER_INTERVAL + Duration::from_secs(1);
        assert_eq!(availability.failure(Unserved::Forbidden, later), Some(OffLog::Off), "off again: a new warning");
    }
}
