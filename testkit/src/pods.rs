//! The pods file the gateway discovers engines from (`--discovery file:PATH`): a Kubernetes
//! `v1 List` of Pods, as `kubectl get pods -o yaml` prints it.

use std::fmt::Write as _;
use std::io;
use std::path::Path;

/// A running engine a pod can point at.
pub trait EngineEndpoint {
    /// The pod name the engine answers as.
    fn pod_name(&self) -> &str;
    /// Its port on 127.0.0.1.
    fn port(&self) -> u16;
}

/// One pod in a pods file. Every pod runs on 127.0.0.1; the port label tells them apart.
#[derive(Clone, Debug)]
pub struct PodSpec {
    /// Pod name (`metadata.name`), echoed by the gateway in `target-pod`.
    pub name: String,
    /// Model served (label `model.aibrix.ai/name`).
    pub model: String,
    /// Serving port (label `model.aibrix.ai/port`).
    pub port: u16,
    /// The pod's Ready condition.
    pub ready: bool,
    /// The `model.aibrix.ai/config` annotation (JSON), when the model has profiles.
    pub config: Option<String>,
    /// Further labels.
    pub labels: Vec<(String, String)>,
    /// Further annotations.
    pub annotations: Vec<(String, String)>,
    /// Environment of the pod's one container.
    pub env: Vec<(String, String)>,
}

impl PodSpec {
    /// A ready pod named `name` serving `model` on 127.0.0.1:`port`.
    pub fn new(name: &str, model: &str, port: u16) -> Self {
        Self {
            name: name.into(),
            model: model.into(),
            port,
            ready: true,
            config: None,
            labels: Vec::new(),
            annotations: Vec::new(),
            env: Vec::new(),
        }
    }

    /// A ready pod backed by `engine`, named as the engine answers.
    pub fn for_engine(engine: &impl EngineEndpoint, model: &str) -> Self {
        Self::new(engine.pod_name(), model, engine.port())
    }

    /// Sets the Ready condition.
    pub fn ready(mut self, ready: bool) -> Self {
        self.ready = ready;
        self
    }

    /// Sets the `model.aibrix.ai/config` annotation.
    pub fn config(mut self, json: &str) -> Self {
        self.config = Some(json.into());
        self
    }

    /// Adds a label.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.into(), value.into()));
        self
    }

    /// Adds a variable to the environment of the pod's container.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Adds an annotation.
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.push((key.into(), value.into()));
        self
    }
}

/// Renders pods as `kubectl get pods -o yaml` would (a v1 List). JSON strings are valid YAML
/// scalars, which keeps quoting simple and exact.
pub fn pods_yaml(pods: &[PodSpec]) -> String {
    if pods.is_empty() {
        // An explicit empty list: a file without items is taken for one cut short.
        return String::from("apiVersion: v1\nkind: List\nitems: []\n");
    }
    let mut out = String::from("apiVersion: v1\nkind: List\nitems:\n");
    for pod in pods {
        let PodSpec { name, model, port, ready, config, labels, annotations, env } = pod;
        let _ = write!(
            out,
            "- apiVersion: v1\n  kind: Pod\n  metadata:\n    name: {}\n    namespace: default\n    labels:\n      \
             model.aibrix.ai/name: {}\n      model.aibrix.ai/port: {}\n",
            quote(name),
            quote(model),
            quote(&port.to_string())
        );
        for (key, value) in labels {
            let _ = writeln!(out, "      {}: {}", quote(key), quote(value));
        }
        if config.is_some() || !annotations.is_empty() {
            out.push_str("    annotations:\n");
        }
        if let Some(config) = config {
            let _ = writeln!(out, "      model.aibrix.ai/config: {}", quote(config));
        }
        for (key, value) in annotations {
            let _ = writeln!(out, "      {}: {}", quote(key), quote(value));
        }
        if !env.is_empty() {
            out.push_str("  spec:\n    containers:\n    - name: engine\n      env:\n");
            for (name, value) in env {
                let _ = writeln!(out, "      - name: {}\n        value: {}", quote(name), quote(value));
            }
        }
        let _ = write!(
            out,
            "  status:\n    podIP: 127.0.0.1\n    conditions:\n    - type: Ready\n      status: {}\n",
            quote(if *ready { "True" } else { "False" })
        );
    }
    out
}

fn quote(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

/// Replaces `path` with `text` in one step (write a sibling, rename it over), so a gateway
/// polling the file never reads half of it.
pub fn write_atomically(path: &Path, text: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Writes `pods` as the pods file at `path`, atomically.
pub fn write_pods(path: &Path, pods: &[PodSpec]) -> io::Result<()> {
    write_atomically(path, &pods_yaml(pods))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn values_are_quoted_exactly() {
        let yaml = pods_yaml(&[PodSpec::new("p0", "org/m", 9000).config(r#"{"profiles":{"a":{}}}"#).ready(false)]);
        assert!(yaml.contains(r#"model.aibrix.ai/name: "org/m""#), "{yaml}");
        assert!(yaml.contains(r#"model.aibrix.ai/config: "{\"profiles\":{\"a\":{}}}""#), "{yaml}");
        assert!(yaml.contains(r#"status: "False""#), "{yaml}");
    }

    #[test]
    fn renders_a_list_the_gateway_reads_back() {
        let config = r#"{"profiles":{"batch":{"routingStrategy":"random","note":"it's \"quoted\""}}}"#;
        let pods = [
            PodSpec::new("llama-0", "demo-llama", 18001).config(config).label("role", "prefill"),
            PodSpec::new("embed-0", "demo-embed", 18003).ready(false),
        ];
        let doc: Value = serde_norway::from_str(&pods_yaml(&pods)).expect("valid YAML");
        assert_eq!(doc["kind"], "List");
        let items = doc["items"].as_array().expect("items");
        assert_eq!(items.len(), 2);
        let llama = &items[0];
        assert_eq!(llama["metadata"]["name"], "llama-0");
        assert_eq!(llama["metadata"]["labels"]["model.aibrix.ai/name"], "demo-llama");
        // Label values are strings, the port too, as Kubernetes requires.
        assert_eq!(llama["metadata"]["labels"]["model.aibrix.ai/port"], "18001");
        assert_eq!(llama["metadata"]["labels"]["role"], "prefill");
        assert_eq!(llama["status"]["podIP"], "127.0.0.1");
        assert_eq!(llama["status"]["conditions"][0]["status"], "True");
        let annotation = llama["metadata"]["annotations"]["model.aibrix.ai/config"].as_str().expect("a string");
        assert_eq!(annotation, config, "the annotation holds the config text unchanged");
        assert!(items[1]["metadata"].get("annotations").is_none());
        assert_eq!(items[1]["status"]["conditions"][0]["status"], "False");
    }

    #[test]
    fn no_pods_is_an_explicit_empty_list() {
        let doc: Value = serde_norway::from_str(&pods_yaml(&[])).expect("valid YAML");
        assert_eq!(doc["items"], serde_json::json!([]));
    }

    #[test]
    fn atomic_writes_replace_the_whole_file() {
        let dir = std::env::temp_dir().join(format!("testkit-pods-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let path = dir.join("pods.yaml");
        write_pods(&path, &[PodSpec::new("a", "m", 1), PodSpec::new("b", "m", 2)]).expect("first write");
        write_pods(&path, &[PodSpec::new("c", "m", 3)]).expect("second write");
        let text = std::fs::read_to_string(&path).expect("read back");
        assert_eq!(text, pods_yaml(&[PodSpec::new("c", "m", 3)]));
        assert!(!path.with_extension("tmp").exists(), "no temporary file left");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
