//! What the gateway knows about one engine pod, read from Kubernetes pod
//! metadata (AIBrix's labels: `model.aibrix.ai/name`, `model.aibrix.ai/port`...).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use k8s_openapi::api::core::v1::Pod;

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
/// PD: the roleset a pod belongs to.
pub const ROLESET_LABEL: &str = "roleset-name";
/// PD: `prefill` or `decode`.
pub const ROLE_LABEL: &str = "role-name";

const DEFAULT_PORT: u16 = 8000;

/// Live load of one pod as the gateway sees it. Shared between pod-store
/// generations so a reload never resets the count of requests in flight.
#[derive(Debug, Default)]
pub struct PodLoad {
    in_flight: AtomicUsize,
    /// Upstream connection slots (`--max-connections-per-pod`), made on
    /// first use; one HTTP/1.1 request in flight holds one connection.
    connection_slots: std::sync::OnceLock<Arc<tokio::sync::Semaphore>>,
}

impl PodLoad {
    /// Requests routed to the pod whose response has not ended yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The pod's upstream connection slots, `cap` of them.
    pub fn connection_slots(&self, cap: usize) -> Arc<tokio::sync::Semaphore> {
        Arc::clone(self.connection_slots.get_or_init(|| Arc::new(tokio::sync::Semaphore::new(cap))))
    }

    /// Marks one more request as running on the pod until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
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
    pub labels: BTreeMap<String, String>,
    /// Raw `model.aibrix.ai/config` annotation, parsed by the profiles module.
    pub config_annotation: Option<String>,
    /// Ready for new requests: has an IP, is not terminating, condition Ready=True.
    pub ready: bool,
    pub load: Arc<PodLoad>,
}

/// Why a pod carrying the model label could not be used at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodError {
    #[error("pod has no metadata.name")]
    NoName,
    #[error("label {label}={value:?} is not a port number")]
    BadPort { label: &'static str, value: String },
}

impl PodInfo {
    /// Reads a Kubernetes pod. `Ok(None)` for pods without the model label
    /// (they are not ours); `Err` for pods that carry it but are unusable.
    pub fn from_pod(pod: &Pod) -> Result<Option<Self>, PodError> {
        let meta = &pod.metadata;
        let labels = meta.labels.clone().unwrap_or_default();
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
        let port = port_label(&labels, PORT_LABEL)?.unwrap_or(DEFAULT_PORT);
        let metric_port = port_label(&labels, METRIC_PORT_LABEL)?.unwrap_or(port);
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
        Ok(Some(Self {
            key: format!("{namespace}/{name}"),
            addr_text: addr.map(|a| a.to_string()).unwrap_or_default(),
            ready: addr.is_some() && condition_ready && !terminating,
            addr,
            metric_port,
            engine: labels.get(ENGINE_LABEL).cloned().unwrap_or_else(|| "vllm".to_owned()),
            roleset: labels.get(ROLESET_LABEL).cloned(),
            role,
            config_annotation: annotations.and_then(|a| a.get(CONFIG_ANNOTATION)).cloned(),
            labels,
            name,
            namespace,
            model,
            load: Arc::default(),
        }))
    }
}

fn port_label(labels: &BTreeMap<String, String>, label: &'static str) -> Result<Option<u16>, PodError> {
    match labels.get(label) {
        None => Ok(None),
        Some(value) => match value.trim().parse::<u16>() {
            Ok(port) if port > 0 => Ok(Some(port)),
            _ => Err(PodError::BadPort { label, value: value.clone() }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn bad_port_label_is_an_error() {
        let bad = READY.replace("\"9000\"", "\"http\"");
        assert_eq!(
            PodInfo::from_pod(&pod(&bad)).expect_err("bad port"),
            PodError::BadPort { label: PORT_LABEL, value: "http".into() }
        );
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
}
