//! The pods file the gateway discovers engines from (`--discovery file:PATH`): a Kubernetes
//! `v1 List` of Pods, as `kubectl get pods -o yaml` prints it.

use std::fmt::Write as _;

/// One mock engine as a pod. All run on 127.0.0.1; the port label tells them apart.
#[derive(Debug, Clone)]
pub struct PodSpec {
    /// Pod name (`metadata.name`), echoed by the gateway in `target-pod`.
    pub name: String,
    /// Model served (label `model.aibrix.ai/name`).
    pub model: String,
    /// Serving port (label `model.aibrix.ai/port`).
    pub port: u16,
    /// The `model.aibrix.ai/config` annotation (JSON), when the model has profiles.
    pub config: Option<serde_json::Value>,
}

/// Renders the pods as a ready `v1 List` in YAML.
pub fn render_pods_yaml(pods: &[PodSpec]) -> String {
    if pods.is_empty() {
        // An explicit empty list: a file without items is taken for one cut short.
        return String::from("apiVersion: v1\nkind: List\nitems: []\n");
    }
    let mut out = String::from("apiVersion: v1\nkind: List\nitems:\n");
    for pod in pods {
        let PodSpec { name, model, port, config } = pod;
        // Names and JSON go through single-quoted YAML scalars, where the only escape is ''.
        let _ = write!(
            out,
            "- apiVersion: v1\n  kind: Pod\n  metadata:\n    name: {name}\n    namespace: default\n    \
             labels:\n      model.aibrix.ai/name: {model}\n      model.aibrix.ai/port: \"{port}\"\n",
            name = yaml_quote(name),
            model = yaml_quote(model),
        );
        if let Some(config) = config {
            let _ =
                write!(out, "    annotations:\n      model.aibrix.ai/config: {}\n", yaml_quote(&config.to_string()));
        }
        out.push_str(
            "  status:\n    phase: Running\n    podIP: 127.0.0.1\n    conditions:\n    \
             - type: Ready\n      status: \"True\"\n",
        );
    }
    out
}

fn yaml_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pods() -> Vec<PodSpec> {
        vec![
            PodSpec {
                name: "llama-0".into(),
                model: "demo-llama".into(),
                port: 18001,
                config: Some(json!({
                    "defaultProfile": "default",
                    "profiles": {"default": {"routingStrategy": "least-request"},
                                 "batch": {"routingStrategy": "random", "note": "it's"}}
                })),
            },
            PodSpec { name: "embed-0".into(), model: "demo-embed".into(), port: 18003, config: None },
        ]
    }

    #[test]
    fn renders_a_list_of_ready_pods() {
        let yaml = render_pods_yaml(&pods());
        let doc: serde_json::Value = serde_norway::from_str(&yaml).expect("valid YAML");
        assert_eq!(doc["kind"], "List");
        let items = doc["items"].as_array().unwrap();
        assert_eq!(items.len(), 2);

        let llama = &items[0];
        assert_eq!(llama["kind"], "Pod");
        assert_eq!(llama["metadata"]["name"], "llama-0");
        assert_eq!(llama["metadata"]["labels"]["model.aibrix.ai/name"], "demo-llama");
        // The port label is a string, as Kubernetes requires for label values.
        assert_eq!(llama["metadata"]["labels"]["model.aibrix.ai/port"], "18001");
        assert_eq!(llama["status"]["podIP"], "127.0.0.1");
        assert_eq!(llama["status"]["conditions"][0]["type"], "Ready");
        assert_eq!(llama["status"]["conditions"][0]["status"], "True");

        // The annotation is a string holding the JSON config, quotes and all.
        let annotation = llama["metadata"]["annotations"]["model.aibrix.ai/config"].as_str().unwrap();
        let config: serde_json::Value = serde_json::from_str(annotation).unwrap();
        assert_eq!(config["profiles"]["batch"]["routingStrategy"], "random");
        assert_eq!(config["profiles"]["batch"]["note"], "it's");

        assert!(items[1]["metadata"].get("annotations").is_none());
    }
}
