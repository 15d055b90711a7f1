//! LoRA adapters: model names that route to some of a base model's pods.
//!
//! Two sources say which pod serves which adapter, and the store takes their
//! union: each ready engine's own `/v1/models` (entries whose `parent` is a
//! base model, read by `engine_metrics::served_models`), and AIBrix's
//! `ModelAdapter` resources (`status.instances`, watched with
//! `--discovery kubernetes`). An adapter becomes one more model of the
//! snapshot, whose pods are the base model's own (the same in-flight
//! counters), with the base model's config profiles unless the adapter has
//! its own. A name that is already a base model stays the base model.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::pod::PodInfo;
use super::store::ModelPods;
use crate::profiles::ModelConfig;

/// Where a binding was learned; each source replaces only its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AdapterSource {
    /// The engines' `/v1/models`.
    Engines,
    /// AIBrix's `ModelAdapter` resources.
    ModelAdapter,
}

/// One pod serving one adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterBinding {
    /// The adapter's model name, as requests name it.
    pub adapter: String,
    /// The base model the adapter extends; `None` takes the pod's model.
    pub parent: Option<String>,
    pub namespace: String,
    /// The pod's name: every data-parallel rank of it serves the adapter
    /// unless `key` names one.
    pub pod: String,
    /// One rank's pod key (`namespace/name:port`), when only it was seen.
    pub key: Option<String>,
    /// The adapter's own `model.aibrix.ai/config` annotation, if it has one.
    pub config_annotation: Option<String>,
}

impl AdapterBinding {
    fn serves(&self, pod: &PodInfo) -> bool {
        pod.namespace == self.namespace
            && pod.name == self.pod
            && self.key.as_ref().is_none_or(|key| *key == pod.key)
            && self.parent.as_ref().is_none_or(|parent| *parent == pod.model)
    }
}

/// A pod of a base model, with its model.
type BasePod<'a> = (&'a Arc<ModelPods>, &'a Arc<PodInfo>);

/// The adapter entries for `bases` (the base models, by name) from every
/// source's bindings. An adapter naming a base model, or whose pods are all
/// gone, has no entry; `shadowed` is told the names that collide.
pub fn entries(
    bases: &HashMap<String, Arc<ModelPods>>,
    bindings: &BTreeMap<AdapterSource, Vec<AdapterBinding>>,
    mut invalid_config: impl FnMut(&str, &str, &crate::profiles::ConfigError),
    mut shadowed: impl FnMut(&str),
) -> Vec<(String, Arc<ModelPods>)> {
    let mut by_adapter: BTreeMap<&str, Vec<&AdapterBinding>> = BTreeMap::new();
    for binding in bindings.values().flatten() {
        by_adapter.entry(binding.adapter.as_str()).or_default().push(binding);
    }
    if by_adapter.is_empty() {
        return Vec::new();
    }
    // Every base pod (each rank) by namespace and name, once per publish.
    let mut by_name: HashMap<(&str, &str), Vec<BasePod<'_>>> = HashMap::new();
    for base in bases.values().filter(|base| base.parent.is_none()) {
        for pod in &base.pods {
            by_name.entry((pod.namespace.as_str(), pod.name.as_str())).or_default().push((base, pod));
        }
    }
    let mut out = Vec::new();
    for (adapter, bindings) in by_adapter {
        if bases.contains_key(adapter) {
            shadowed(adapter);
            continue;
        }
        let mut seen: HashSet<&str> = HashSet::new();
        let mut pods: Vec<Arc<PodInfo>> = Vec::new();
        let mut parent: Option<&Arc<ModelPods>> = None;
        for binding in &bindings {
            let named = by_name.get(&(binding.namespace.as_str(), binding.pod.as_str()));
            for &(base, pod) in named.into_iter().flatten().filter(|(_, pod)| binding.serves(pod)) {
                if seen.insert(pod.key.as_str()) {
                    pods.push(Arc::clone(pod));
                    // The first base in name order is the parent of a
                    // (rare) adapter bound to pods of several models.
                    if parent.is_none_or(|p| base.name < p.name) {
                        parent = Some(base);
                    }
                }
            }
        }
        let Some(parent) = parent else { continue };
        pods.sort_by(|a, b| a.key.cmp(&b.key));
        let ready = pods.iter().filter(|pod| pod.ready).cloned().collect();
        let own = bindings.iter().filter_map(|b| Some((b, b.config_annotation.as_deref()?)));
        let config = ModelConfig::first_valid(own, |_, raw, err| invalid_config(adapter, raw, err))
            .map(Arc::new)
            .or_else(|| parent.config.clone());
        let entry = ModelPods {
            name: Arc::from(adapter),
            pods,
            ready,
            config,
            custom_paths: Vec::new(),
            parent: Some(Arc::clone(&parent.name)),
        };
        out.push((adapter.to_owned(), Arc::new(entry)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::store::tests::test_pod;

    fn base(name: &str, pods: Vec<PodInfo>, config: Option<&str>) -> (String, Arc<ModelPods>) {
        let pods: Vec<Arc<PodInfo>> = pods.into_iter().map(Arc::new).collect();
        let ready = pods.iter().filter(|p| p.ready).cloned().collect();
        let config = config.map(|raw| Arc::new(ModelConfig::parse(raw).expect("config")));
        let entry = ModelPods { name: Arc::from(name), pods, ready, config, custom_paths: Vec::new(), parent: None };
        (name.to_owned(), Arc::new(entry))
    }

    fn bind(adapter: &str, parent: Option<&str>, pod: &str) -> AdapterBinding {
        AdapterBinding {
            adapter: adapter.to_owned(),
            parent: parent.map(str::to_owned),
            namespace: "default".to_owned(),
            pod: pod.to_owned(),
            key: None,
            config_annotation: None,
        }
    }

    fn names(entry: &ModelPods) -> Vec<&str> {
        entry.pods.iter().map(|p| p.name.as_str()).collect()
    }

    #[test]
    fn an_adapter_routes_to_the_union_of_its_sources_pods_and_shares_their_counters() {
        let bases: HashMap<_, _> = [base(
            "llama",
            vec![test_pod("llama", "p0", 1, true), test_pod("llama", "p1", 2, false), test_pod("llama", "p2", 3, true)],
            Some(r#"{"profiles":{"default":{"routingStrategy":"random"}}}"#),
        )]
        .into();
        let bindings = BTreeMap::from([
            (AdapterSource::Engines, vec![bind("sql", None, "p0")]),
            (AdapterSource::ModelAdapter, vec![bind("sql", Some("llama"), "p1"), bind("sql", None, "p0")]),
        ]);
        let entries = entries(&bases, &bindings, |_, _, _| panic!("no config"), |_| panic!("no collision"));
        assert_eq!(entries.len(), 1);
        let (name, sql) = &entries[0];
        assert_eq!(name, "sql");
        assert_eq!(names(sql), ["p0", "p1"]);
        assert_eq!(sql.ready.len(), 1, "p1 is not ready");
        assert_eq!(sql.parent.as_deref(), Some("llama"));
        assert!(Arc::ptr_eq(&sql.pods[0], &bases["llama"].pods[0]), "the base pod itself, with its load");
        let config = sql.config.as_ref().expect("the base model's profiles");
        assert_eq!(config.profiles["default"].routing_strategy.as_deref(), Some("random"));
    }

    #[test]
    fn own_config_wins_a_wrong_parent_or_a_base_name_gives_no_entry() {
        let bases: HashMap<_, _> = [
            base("llama", vec![test_pod("llama", "p0", 1, true)], None),
            base("qwen", vec![test_pod("qwen", "q0", 2, true)], None),
        ]
        .into();
        let mut own = bind("sql", None, "p0");
        own.config_annotation = Some(r#"{"profiles":{"default":{"routingStrategy":"least-request"}}}"#.to_owned());
        let bindings = BTreeMap::from([(
            AdapterSource::Engines,
            vec![own, bind("chat", Some("qwen"), "p0"), bind("qwen", None, "p0")],
        )]);
        let mut collisions = Vec::new();
        let entries = entries(&bases, &bindings, |_, _, _| panic!("valid"), |name| collisions.push(name.to_owned()));
        let names: Vec<&str> = entries.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["sql"], "chat names a parent p0 is not of; qwen is a base model");
        assert_eq!(collisions, ["qwen"]);
        let config = entries[0].1.config.as_ref().expect("own");
        assert_eq!(config.profiles["default"].routing_strategy.as_deref(), Some("least-request"));
    }

    #[test]
    fn a_rank_key_binds_only_that_rank() {
        let mut ranked = test_pod("llama", "p0", 1000, true);
        ranked.data_parallel = 2;
        let ranks = ranked.ranks();
        let keys: Vec<String> = ranks.iter().map(|p| p.key.clone()).collect();
        let bases: HashMap<_, _> = [base("llama", ranks, None)].into();
        let mut one = bind("sql", None, "p0");
        one.key = Some(keys[1].clone());
        let entries = entries(&bases, &BTreeMap::from([(AdapterSource::Engines, vec![one])]), |_, _, _| {}, |_| {});
        assert_eq!(entries[0].1.pods.iter().map(|p| p.key.as_str()).collect::<Vec<_>>(), [keys[1].as_str()]);
        let all = entries_for(&bases, bind("sql", None, "p0"));
        assert_eq!(all.pods.len(), 2, "a pod name binds every rank");
    }

    fn entries_for(bases: &HashMap<String, Arc<ModelPods>>, binding: AdapterBinding) -> Arc<ModelPods> {
        let bindings = BTreeMap::from([(AdapterSource::ModelAdapter, vec![binding])]);
        entries(bases, &bindings, |_, _, _| {}, |_| {}).remove(0).1
    }
}
