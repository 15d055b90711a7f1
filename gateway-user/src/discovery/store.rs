//! The pod store: the one place routing reads pods from.
//!
//! Discovery sources (pods file, Kubernetes) hand the store the full set of
//! pods they know; the store publishes an immutable [`Snapshot`] that request
//! handlers load without locking. Per-pod load counters are carried over from
//! one snapshot to the next, so a reload never forgets requests in flight.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;

use super::adapters::{self, AdapterBinding, AdapterSource};
use super::pod::PodInfo;
use crate::metrics::Metrics;
use crate::profiles::ModelConfig;

/// All pods of one model in one snapshot.
#[derive(Debug)]
pub struct ModelPods {
    /// Shared so metrics and request records label by it without copying.
    pub name: Arc<str>,
    /// Every pod of the model, ready or not, ordered by `namespace/name`.
    pub pods: Vec<Arc<PodInfo>>,
    /// The pods that may take new requests.
    pub ready: Vec<Arc<PodInfo>>,
    /// Config profiles from the first pod whose annotation parses.
    pub config: Option<Arc<ModelConfig>>,
    /// Path prefixes any of the model's pods lists in its custom-paths annotation.
    pub custom_paths: Vec<String>,
    /// For a LoRA adapter, the base model whose pods serve it.
    pub parent: Option<Arc<str>>,
}

impl ModelPods {
    /// Whether one of the model's custom path prefixes covers `path`.
    pub fn serves_custom_path(&self, path: &str) -> bool {
        self.custom_paths.iter().any(|prefix| super::pod::under_prefix(path, prefix))
    }
}

/// An immutable view of every known model and pod.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub models: HashMap<String, Arc<ModelPods>>,
}

impl Snapshot {
    /// The pods of `model`, if any pod serves it.
    pub fn model(&self, model: &str) -> Option<&Arc<ModelPods>> {
        self.models.get(model)
    }

    /// The base models: every model but the LoRA adapters, whose pods are
    /// theirs too.
    pub fn base_models(&self) -> impl Iterator<Item = &Arc<ModelPods>> {
        self.models.values().filter(|model| model.parent.is_none())
    }

    /// Whether any model's custom path prefixes cover `path`.
    pub fn is_custom_path(&self, path: &str) -> bool {
        self.models.values().any(|model| model.serves_custom_path(path))
    }

    /// Model names in a stable order.
    pub fn model_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.models.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    fn pod(&self, model: &str, key: &str) -> Option<&Arc<PodInfo>> {
        self.models.get(model)?.pods.iter().find(|p| p.key == key)
    }
}

impl crate::metrics::PodInFlight for PodStore {
    fn visit(&self, visit: &mut dyn FnMut(&str, &str, i64)) {
        let snapshot = self.snapshot();
        for name in snapshot.model_names() {
            // An adapter's pods are its base model's, counted there.
            let Some(model) = snapshot.model(name).filter(|model| model.parent.is_none()) else { continue };
            for pod in &model.pods {
                visit(name, &pod.key, i64::try_from(pod.load.in_flight()).unwrap_or(i64::MAX));
            }
        }
    }
}

/// Shared, lock-free-to-read pod state.
pub struct PodStore {
    current: ArcSwap<Snapshot>,
    synced: AtomicBool,
    metrics: Arc<Metrics>,
    /// `(pod key, annotation)` pairs already reported as invalid, so a bad
    /// annotation is logged once rather than on every reload.
    reported_configs: Mutex<HashSet<(String, String)>>,
    /// Each source's adapter bindings; also held while a snapshot is built
    /// and published, so pod and adapter updates never overwrite each other.
    adapters: Mutex<BTreeMap<AdapterSource, Vec<AdapterBinding>>>,
}

impl PodStore {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            current: ArcSwap::from_pointee(Snapshot::default()),
            synced: AtomicBool::new(false),
            metrics,
            reported_configs: Mutex::new(HashSet::new()),
            adapters: Mutex::new(BTreeMap::new()),
        }
    }

    /// The current snapshot. Cheap: one atomic load and a reference count.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// True once a discovery source has delivered a complete pod list.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Replaces the whole pod set with `pods`, as one complete list from a
    /// discovery source.
    pub fn replace_all(&self, pods: Vec<PodInfo>) {
        let adapters = self.adapters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let previous = self.current.load();
        let mut by_model: HashMap<String, Vec<Arc<PodInfo>>> = HashMap::new();
        for mut pod in pods.into_iter().flat_map(PodInfo::ranks) {
            if let Some(old) = previous.pod(&pod.model, &pod.key) {
                pod.load = Arc::clone(&old.load);
                if old.ready != pod.ready {
                    self.metrics.pod_readiness_transition(&pod.model, &pod.key, pod.ready);
                }
            }
            by_model.entry(pod.model.clone()).or_default().push(Arc::new(pod));
        }
        let models = by_model
            .into_iter()
            .map(|(name, mut pods)| {
                pods.sort_by(|a, b| a.key.cmp(&b.key));
                let ready = pods.iter().filter(|p| p.ready).cloned().collect();
                let config = self.first_valid_config(&pods);
                let mut custom_paths: Vec<String> =
                    pods.iter().flat_map(|pod| pod.custom_paths.iter().cloned()).collect();
                custom_paths.sort_unstable();
                custom_paths.dedup();
                let entry =
                    ModelPods { name: Arc::from(name.as_str()), pods, ready, config, custom_paths, parent: None };
                (name, Arc::new(entry))
            })
            .collect();
        self.publish(models, &adapters);
        // Only a pod list makes the store synced: adapters alone are no list.
        self.synced.store(true, Ordering::Release);
    }

    /// Replaces the adapter bindings `source` knows with `bindings`. Only a
    /// pod list makes the store synced: adapters never gate readiness.
    pub fn set_adapters(&self, source: AdapterSource, bindings: Vec<AdapterBinding>) {
        let mut adapters = self.adapters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if adapters.get(&source).is_some_and(|known| *known == bindings) {
            return;
        }
        adapters.insert(source, bindings);
        let current = self.current.load();
        let bases = current
            .models
            .iter()
            .filter(|(_, model)| model.parent.is_none())
            .map(|(name, model)| (name.clone(), Arc::clone(model)))
            .collect();
        self.publish(bases, &adapters);
    }

    /// Publishes the base models `models` with the adapters of `bindings`.
    fn publish(
        &self,
        mut models: HashMap<String, Arc<ModelPods>>,
        bindings: &BTreeMap<AdapterSource, Vec<AdapterBinding>>,
    ) {
        let entries = adapters::entries(
            &models,
            bindings,
            |adapter, raw, err| self.report_invalid_adapter_config(adapter, raw, err),
            |adapter| self.report_shadowed(adapter),
        );
        models.extend(entries);
        let snapshot = Arc::new(Snapshot { models });
        if let Some(aibrix) = self.metrics.aibrix() {
            // Series of pods that left go with them.
            let live: HashSet<&str> =
                snapshot.models.values().flat_map(|model| model.pods.iter().map(|pod| pod.name.as_str())).collect();
            aibrix.retain_pods(&live);
        }
        self.current.store(snapshot);
    }

    fn first_valid_config(&self, pods: &[Arc<PodInfo>]) -> Option<Arc<ModelConfig>> {
        let annotations = pods.iter().filter_map(|pod| Some((pod, pod.config_annotation.as_deref()?)));
        ModelConfig::first_valid(annotations, |pod, raw, err| self.report_invalid_config(pod, raw, err)).map(Arc::new)
    }

    fn report_invalid_adapter_config(&self, adapter: &str, raw: &str, err: &crate::profiles::ConfigError) {
        if self.first_report(format!("adapter:{adapter}"), raw) {
            tracing::warn!(adapter, error = %err, "ignoring invalid model.aibrix.ai/config annotation of a LoRA adapter");
            self.metrics.invalid_config(adapter);
        }
    }

    fn report_shadowed(&self, adapter: &str) {
        if self.first_report(format!("shadowed:{adapter}"), "") {
            tracing::warn!(adapter, "a LoRA adapter has the name of a base model; the name routes to the base model");
        }
    }

    /// True the first time `(what, raw)` is reported.
    fn first_report(&self, what: String, raw: &str) -> bool {
        self.reported_configs.lock().map(|mut seen| seen.insert((what, raw.to_owned()))).unwrap_or(true)
    }

    fn report_invalid_config(&self, pod: &PodInfo, raw: &str, err: &crate::profiles::ConfigError) {
        let first_time =
            self.reported_configs.lock().map(|mut seen| seen.insert((pod.key.clone(), raw.to_owned()))).unwrap_or(true);
        if first_time {
            tracing::warn!(pod = %pod.key, model = %pod.model, error = %err,
                "ignoring invalid model.aibrix.ai/config annotation");
            self.metrics.invalid_config(&pod.model);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::discovery::pod::Role;
    use std::collections::BTreeMap;

    pub fn test_pod(model: &str, name: &str, port: u16, ready: bool) -> PodInfo {
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        PodInfo {
            key: format!("default/{name}"),
            name: name.to_owned(),
            namespace: "default".to_owned(),
            model: model.to_owned(),
            addr: Some(addr),
            addr_text: addr.to_string(),
            metric_port: port,
            engine: "vllm".to_owned(),
            roleset: None,
            role: Role::Combined,
            labels: BTreeMap::new(),
            config_annotation: None,
            pd: Default::default(),
            custom_paths: Vec::new(),
            data_parallel: 1,
            ready,
            load: Arc::default(),
            series: Default::default(),
        }
    }

    fn store() -> PodStore {
        PodStore::new(Arc::new(Metrics::new()))
    }

    #[test]
    fn groups_pods_by_model_and_filters_ready() {
        let store = store();
        assert!(!store.is_synced());
        store.replace_all(vec![
            test_pod("a", "a-1", 1, true),
            test_pod("a", "a-0", 2, false),
            test_pod("b", "b-0", 3, true),
        ]);
        assert!(store.is_synced());
        let snap = store.snapshot();
        assert_eq!(snap.model_names(), vec!["a", "b"]);
        let a = snap.model("a").expect("model a");
        assert_eq!(a.pods.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["a-0", "a-1"]);
        assert_eq!(a.ready.len(), 1);
        assert_eq!(a.ready[0].name, "a-1");
    }

    #[test]
    fn in_flight_counts_survive_a_reload() {
        let store = store();
        store.replace_all(vec![test_pod("a", "a-0", 1, true)]);
        let guard = store.snapshot().model("a").expect("a").ready[0].load.start();
        // Pod turns not-ready: it keeps its in-flight request.
        store.replace_all(vec![test_pod("a", "a-0", 1, false)]);
        let snap = store.snapshot();
        let pod = &snap.model("a").expect("a").pods[0];
        assert!(!pod.ready);
        assert_eq!(pod.load.in_flight(), 1);
        drop(guard);
        assert_eq!(pod.load.in_flight(), 0);
    }

    #[test]
    fn first_parsable_config_wins_and_bad_one_is_skipped() {
        let store = store();
        let mut bad = test_pod("a", "a-0", 1, true);
        bad.config_annotation = Some("{not json".to_owned());
        let mut good = test_pod("a", "a-1", 2, true);
        good.config_annotation = Some(r#"{"profiles":{"default":{"routingStrategy":"random"}}}"#.to_owned());
        store.replace_all(vec![bad, good]);
        let snap = store.snapshot();
        let config = snap.model("a").expect("a").config.as_ref().expect("config");
        assert_eq!(config.profiles["default"].routing_strategy.as_deref(), Some("random"));
    }

    #[test]
    fn adapters_before_the_first_pod_list_do_not_make_the_store_synced() {
        let store = store();
        let binding = AdapterBinding {
            adapter: "sql".to_owned(),
            parent: None,
            namespace: "default".to_owned(),
            pod: "p0".to_owned(),
            key: None,
            config_annotation: None,
        };
        store.set_adapters(AdapterSource::ModelAdapter, vec![binding]);
        assert!(!store.is_synced(), "readiness waits for pods, never for adapters");
        assert!(store.snapshot().model("sql").is_none(), "no pods yet");
        store.replace_all(vec![test_pod("llama", "p0", 1, true)]);
        assert!(store.is_synced());
        assert_eq!(store.snapshot().model("sql").expect("bound once the pods are known").pods.len(), 1);
    }

    #[test]
    fn adapters_follow_pod_reloads_and_each_source_replaces_only_its_own() {
        let store = store();
        store.replace_all(vec![test_pod("llama", "p0", 1, true), test_pod("llama", "p1", 2, true)]);
        let binding = |pod: &str| AdapterBinding {
            adapter: "sql".to_owned(),
            parent: None,
            namespace: "default".to_owned(),
            pod: pod.to_owned(),
            key: None,
            config_annotation: None,
        };
        store.set_adapters(AdapterSource::Engines, vec![binding("p0")]);
        store.set_adapters(AdapterSource::ModelAdapter, vec![binding("p1")]);
        let pods = |store: &PodStore| {
            store.snapshot().model("sql").map(|m| m.pods.iter().map(|p| p.name.clone()).collect::<Vec<_>>())
        };
        assert_eq!(pods(&store), Some(vec!["p0".to_owned(), "p1".to_owned()]));
        store.set_adapters(AdapterSource::Engines, Vec::new());
        assert_eq!(pods(&store), Some(vec!["p1".to_owned()]));
        // A reload keeps the bindings; a pod that left takes the adapter with it.
        store.replace_all(vec![test_pod("llama", "p0", 1, true)]);
        assert_eq!(pods(&store), None);
        store.replace_all(vec![test_pod("llama", "p0", 1, true), test_pod("llama", "p1", 2, false)]);
        let snap = store.snapshot();
        let sql = snap.model("sql").expect("back with p1");
        assert!(sql.ready.is_empty());
        assert_eq!(sql.parent.as_deref(), Some("llama"));
        assert_eq!(snap.model_names(), ["llama", "sql"]);
    }
}
